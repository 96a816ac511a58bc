"""Multi-process training with torchrun on CPU (gloo): DDP and FSDP train, evaluate, export
checkpoints that load everywhere, agree with each other, and resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from subprocess import PIPE

import pytest
from transformers import AutoModelForCausalLM

from lib.data import bundled_documents, load_documents, prepare_data, split_documents
from lib.inference import GenerationParams, InferenceService
from lib.presets import REPO_ROOT
from lib.training.evaluation import evaluate

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "slice.txt"
    path.write_text("\n".join(bundled_documents()[:300]), encoding="utf-8")
    return path


def torchrun(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(REPO_ROOT / "train_distributed.py"),
        *args,
        "--no-progress",
    ]
    with subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=PIPE, stderr=PIPE, text=True, env=env) as p:
        try:
            out, err = p.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            # SIGTERM: torchrun ends its workers (they run in sessions of their own, so a SIGKILL
            # to torchrun, subprocess.run's answer to a timeout, would leave them waiting)
            p.terminate()
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
            raise
    r = subprocess.CompletedProcess(cmd, p.returncode, out, err)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def common(corpus, out, *extra):
    return [
        "--data",
        str(corpus),
        "--output-dir",
        str(out),
        "--block-size",
        "32",
        "--batch-size",
        "2",
        "--warmup-steps",
        "2",
        "--eval-every",
        "3",
        "--cache-dir",
        str(out.parent / "cache"),
        *extra,
    ]


MODES = {
    "fsdp": ["--mode", "fsdp", "--save-every", "3"],
    "ddp": ["--mode", "baseline", "--peak-tflops", "1"],
    "zero2": ["--mode", "deepspeed", "--zero-stage", "2"],
    "zero3": ["--mode", "deepspeed", "--zero-stage", "3", "--save-every", "3"],
}


@pytest.fixture(scope="module")
def runs(corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    for name, args in MODES.items():
        torchrun(*common(corpus, root / name, *args, "--vocab-size", "400", "--max-steps", "6"))
    return root


def card(path):
    return json.loads((path / "final" / "training_card.json").read_text(encoding="utf-8"))


@pytest.mark.parametrize("mode", list(MODES))
def test_mode_exports_the_trained_weights(runs, corpus, mode):
    final = runs / mode / "final"
    c = card(runs / mode)
    assert c["world_size"] == 2 and c["steps"] == 6 and c["tokens_seen"] == 6 * 2 * 2 * 32
    # plain transformers loads it, with the tied input/output embedding intact
    model = AutoModelForCausalLM.from_pretrained(str(final))
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    # the exported weights give the validation loss measured inside training
    service = InferenceService.from_checkpoint(final)
    train_docs, val_docs = split_documents(load_documents(str(corpus)), 0.05)
    data = prepare_data("", service.tokenizer, 32, docs=(train_docs, val_docs))
    assert evaluate(service.model, data)["val_loss"] == pytest.approx(c["val_loss"], abs=1e-3)
    assert (
        service.generate("Привет", GenerationParams(max_new_tokens=4, seed=0)).completion_tokens
        >= 1
    )


def test_ddp_and_fsdp_train_the_same_model(runs):
    assert card(runs / "fsdp")["val_loss"] == pytest.approx(
        card(runs / "ddp")["val_loss"], abs=1e-3
    )


@pytest.mark.parametrize("mode", ["fsdp", "zero3"])
def test_sharded_modes_resume_from_their_state_checkpoints(runs, corpus, mode):
    torchrun(*common(corpus, runs / mode, *MODES[mode], "--max-steps", "9", "--resume", "auto"))
    c = card(runs / mode)
    assert c["steps"] == 9 and c["resumed_from"].endswith("step-0000006")


def test_resumed_sharded_runs_agree(runs):
    assert card(runs / "fsdp")["val_loss"] == pytest.approx(
        card(runs / "zero3")["val_loss"], abs=1e-3
    )


def test_mfu_counts_every_ranks_peak(runs, corpus, tmp_path):
    """tokens/s counts both ranks' tokens, so MFU must divide by both ranks' peak: per device, the
    2-process run's MFU per token/s is the 1-process run's (the same model, block and peak)."""
    one = tmp_path / "one"
    r = subprocess.run(
        [
            sys.executable,
            str(REPO_ROOT / "train_distributed.py"),
            *common(corpus, one, *MODES["ddp"], "--vocab-size", "400", "--max-steps", "6"),
            "--no-progress",
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    single, double = card(one)["throughput"], card(runs / "ddp")["throughput"]
    assert card(runs / "ddp")["world_size"] == 2
    per_device = double["tokens_per_s"] / 2
    assert double["mfu"] / per_device == pytest.approx(single["mfu"] / single["tokens_per_s"])


def test_deepspeed_starts_beside_a_killed_builds_lock(corpus, tmp_path):
    """A run killed while DeepSpeed JIT-built its CPU shared-memory op leaves the op's build lock;
    torch's build then waits on it forever. A ZeRO run keeps the op out (gloo does the
    collectives), so it trains to the end beside such a lock, builds nothing, and leaves the lock
    alone. A hang is a failure: `torchrun` times out (subprocess.TimeoutExpired)."""
    extensions = tmp_path / "torch_extensions"
    lock = extensions / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir(parents=True)
    lock.touch()
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(extensions)}
    out = tmp_path / "zero2"
    torchrun(
        *common(corpus, out, *MODES["zero2"], "--vocab-size", "400", "--max-steps", "6"), env=env
    )
    assert card(out)["steps"] == 6
    assert [p.name for p in lock.parent.iterdir()] == ["lock"]  # nothing built, the lock untouched
