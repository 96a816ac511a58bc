"""Training as a package: gradient accumulation, exact resume, time limits, preemption, atomic
state checkpoints, reporting, MFU. Small real runs on a slice of the bundled corpus."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard

from lib.data import bundled_documents
from lib.modeling import build_model
from lib.presets import PRESETS, REPO_ROOT
from lib.tokenizer import load_tokenizer
from lib.training import train
from lib.training.callbacks import flops_per_token, peak_flops
from lib.training.config import TrainingConfig
from lib.training.loop import accumulate_gradients, cut_rows
from lib.training.state import complete_checkpoints, latest_checkpoint, load_training_state

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "slice.txt"
    path.write_text("\n".join(bundled_documents()[:300]), encoding="utf-8")
    return path


def small_config(corpus: Path, out: Path, **kw) -> TrainingConfig:
    base = dict(
        data=str(corpus),
        output_dir=out,
        vocab_size=400,
        block_size=32,
        batch_size=2,
        max_steps=8,
        warmup_steps=2,
        eval_every=0,
        progress=False,
        report_to="none",
        cache_dir=Path(out).parent / "token-cache",
    )
    if kw.get("resume"):  # a resumed run takes its tokenizer (and vocabulary) from the checkpoint
        base["vocab_size"] = None
    return TrainingConfig(**{**base, **kw})


def test_gradient_accumulation_is_loss_equivalent():
    """batch 4 x accumulation 1 == batch 2 x accumulation 2: same loss, same gradients."""
    torch.manual_seed(0)
    preset = PRESETS["tiny"]
    model = build_model(preset, vocab_size=300, seed=0)
    blocks = torch.randint(0, 300, (4, 17))

    loss_big = accumulate_gradients(model, [blocks])
    grads_big = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    loss_acc = accumulate_gradients(model, [blocks[:2], blocks[2:]])
    grads_acc = [p.grad.clone() for p in model.parameters()]

    assert loss_acc == pytest.approx(loss_big, rel=1e-6)
    for g1, g2 in zip(grads_big, grads_acc, strict=True):
        torch.testing.assert_close(g1, g2, rtol=1e-5, atol=1e-7)


def test_short_context_cuts_the_blocks_into_rows_for_part_of_the_run(corpus, tmp_path):
    blocks = torch.arange(2 * 33).reshape(2, 33)  # two blocks of 32 inputs
    rows = cut_rows(blocks, 8)
    assert rows.shape == (8, 9)  # the same tokens per step, 8 of context at most
    assert torch.equal(rows[:, 1:].flatten(), blocks[:, 1:].flatten())  # each target once
    assert torch.equal(rows[:, :-1].flatten(), blocks[:, :-1].flatten())  # from the same input
    full = train(small_config(corpus, tmp_path / "full"))
    short = train(
        small_config(corpus, tmp_path / "short", short_context=8, short_context_until=0.5)
    )
    # the same first weights and tokens; with 8 tokens of context the first loss is another
    assert short.history[0]["loss"] != pytest.approx(full.history[0]["loss"], rel=1e-4)
    assert short.steps == 8 and all(math.isfinite(h["loss"]) for h in short.history)
    card = json.loads((short.checkpoint / "training_card.json").read_text())
    assert (card["config"]["short_context"], card["block_size"]) == (8, 32)


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_exact_resume_matches_uninterrupted_run(corpus, tmp_path, optimizer):
    straight = train(small_config(corpus, tmp_path / "a", save_every=4, optimizer=optimizer))
    # resume a copy of the run from its step-4 state and finish it
    shutil.copytree(tmp_path / "a" / "checkpoints" / "step-0000004", tmp_path / "step4")
    resumed = train(
        small_config(corpus, tmp_path / "b", resume=str(tmp_path / "step4"), optimizer=optimizer)
    )
    assert resumed.steps == straight.steps == 8
    a = {h["step"]: h["loss"] for h in straight.history}
    b = {h["step"]: h["loss"] for h in resumed.history}
    assert set(b) == set(range(1, 9))  # the history travels with the state
    for step in range(5, 9):
        assert b[step] == pytest.approx(a[step], rel=1e-6, abs=1e-6), step
    assert resumed.val_loss == pytest.approx(straight.val_loss, rel=1e-6)


def test_time_limit_saves_exits_cleanly_and_resumes(corpus, tmp_path):
    out = tmp_path / "run"
    cfg = small_config(corpus, out, max_steps=100_000, time_limit_s=36)
    first = train(cfg)
    assert first.stop_reason == "time_limit" and 0 < first.steps < 100_000
    assert first.state_checkpoint == latest_checkpoint(out)
    assert (first.checkpoint / "model.safetensors").exists()

    second = train(small_config(corpus, out, max_steps=first.steps + 3, resume="auto"))
    assert second.steps == first.steps + 3 and second.stop_reason == "max_steps"


def test_interrupted_saves_never_become_latest(corpus, tmp_path):
    out = tmp_path / "run"
    train(small_config(corpus, out, save_every=2, save_total_limit=2))
    assert [p.name for p in complete_checkpoints(out)] == ["step-0000006", "step-0000008"]
    # what a kill in the middle of a save leaves behind: a hidden temporary dir with a torn file
    torn = out / "checkpoints" / ".step-0000010.tmp-abc"
    torn.mkdir()
    (torn / "state.pt").write_bytes(b"\x80\x02torn")
    assert latest_checkpoint(out).name == "step-0000008"
    resumed = train(small_config(corpus, out, max_steps=9, resume="auto"))
    assert resumed.steps == 9 and not torn.exists()


def endless_run_cli(corpus: Path, out: Path, *extra: str) -> list[str]:
    """A CLI training run that goes on until it is stopped from outside."""
    return [
        sys.executable,
        "-u",
        str(REPO_ROOT / "train_distributed.py"),
        "--data",
        str(corpus),
        "--output-dir",
        str(out),
        "--vocab-size",
        "400",
        "--block-size",
        "32",
        "--batch-size",
        "2",
        "--max-steps",
        "100000",
        "--warmup-steps",
        "2",
        "--no-progress",
        *extra,
    ]


def test_kill_during_training_leaves_only_loadable_checkpoints(corpus, tmp_path):
    out = tmp_path / "run"
    cmd = endless_run_cli(
        corpus, out, "--eval-every", "0", "--save-every", "1", "--save-total-limit", "1000"
    )
    proc = subprocess.Popen(
        cmd, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 120
    while len(complete_checkpoints(out)) < 6 and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # no handler, no cleanup: wherever it was, possibly mid-save
    proc.wait()
    found = complete_checkpoints(out)
    assert len(found) >= 6
    for path in found:
        state = load_training_state(path)
        assert state["step"] == int(path.name.split("-")[1])


def test_sigterm_saves_and_exits_zero(corpus, tmp_path):
    out = tmp_path / "run"
    cmd = endless_run_cli(corpus, out, "--eval-every", "1")
    proc = subprocess.Popen(
        cmd, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    for line in proc.stdout:  # wait until training is under way
        if line.startswith("step 3:"):
            break
    proc.send_signal(signal.SIGTERM)
    rest = proc.stdout.read()
    assert proc.wait(timeout=120) == 0, rest
    assert "stopped early (signal:SIGTERM)" in rest
    assert latest_checkpoint(out) is not None and (out / "final" / "model.safetensors").exists()


def test_wandb_runs_offline_without_an_api_key(corpus, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    out = tmp_path / "run"
    result = train(small_config(corpus, out, max_steps=3, report_to="wandb", run_name="wb-test"))
    assert result.steps == 3
    runs = list((out / "wandb").glob("offline-run-*"))
    assert runs and any(p.suffix == ".wandb" for p in runs[0].iterdir())
    # the mode is a setting (wandb_mode, default offline): the process environment is left alone
    assert "WANDB_MODE" not in os.environ


def test_a_short_cli_run_works_with_the_default_warmup(corpus, tmp_path):
    """`--max-steps 6` alone: the warm-up and evaluation defaults follow the run's length. The
    preset's shape is overridden from the command line (--n-layer, --n-embd, --n-head)."""
    out = tmp_path / "run"
    cmd = endless_run_cli(corpus, out, "--n-layer", "2", "--n-embd", "48", "--n-head", "3")
    i = cmd.index("--warmup-steps")
    del cmd[i : i + 2]  # no --warmup-steps, no --eval-every
    cmd[cmd.index("--max-steps") + 1] = "6"
    r = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    config = json.loads((out / "final" / "training_card.json").read_text())["config"]
    assert (config["max_steps"], config["warmup_steps"], config["eval_every"]) == (6, 0, 1)
    assert r.stdout.count("val loss") == 5 + 1  # steps 1-5, then the final evaluation
    model = json.loads((out / "final" / "config.json").read_text())
    assert (model["n_layer"], model["n_embd"], model["n_head"]) == (2, 48, 3)
    card = json.loads((out / "final" / "training_card.json").read_text())
    assert card["preset"] == "tiny-2x48"


def test_streaming_source_trains_with_its_own_tokenizer(corpus, tmp_path):
    result = train(small_config(corpus, tmp_path / "run", streaming=True, max_steps=3))
    assert result.steps == 3 and (result.checkpoint / "tokenizer.json").exists()


def test_char_level_run_sizes_the_model_to_its_tokenizer(corpus, tmp_path):
    """--tokenizer-type char: a character-level tokenizer trained on the split, a model whose
    vocabulary is the tokenizer's rounded up to 64, and bits/byte on the same scale as BPE's."""
    result = train(small_config(corpus, tmp_path / "char", vocab_size=None, tokenizer_type="char"))
    tokenizer = load_tokenizer(result.checkpoint)
    model = json.loads((result.checkpoint / "config.json").read_text())
    assert len(tokenizer) > 257 and model["vocab_size"] == -(-len(tokenizer) // 64) * 64
    assert tokenizer.convert_ids_to_tokens(tokenizer("мир")["input_ids"]) == ["м", "и", "р"]
    card = json.loads((result.checkpoint / "training_card.json").read_text())
    assert card["config"]["tokenizer_type"] == "char"
    # untrained-ish after 8 steps, but a real figure: about ln(vocab) nats per ~1.8-byte character
    assert 1.0 < card["val_bits_per_byte"] < 8.0


def test_mfu_formula_and_peaks():
    p = PRESETS["gpt2-124m"]
    n = p.approx_parameters() - p.n_positions * p.n_embd
    assert (
        flops_per_token(n, p.n_layer, p.n_head, p.head_dim, 1024)
        == 6 * n + 12 * 12 * 12 * 64 * 1024
    )
    assert peak_flops(torch.device("cpu")) is None
    assert peak_flops(torch.device("cpu"), override_tflops=2.0) == 2e12


def test_named_held_out_sets_are_evaluated_and_recorded(corpus, tmp_path):
    """--eval-data NAME=PATH: each set's bits/byte in the evaluation log, the result and the card;
    --join-documents leaves the validation split (and so its figure's meaning) as it is."""
    other = tmp_path / "proverbs.txt"
    other.write_text(
        "\n".join(["Без труда не выловишь и рыбку из пруда.", "Тише едешь — дальше будешь."] * 40),
        encoding="utf-8",
    )
    extra = tmp_path / "extra.txt"  # one line holds a held-out text: dropped before training
    extra.write_text(
        "Бабушка говорила: тише едешь, дальше будешь.\nДальше было тихо.\n", encoding="utf-8"
    )
    out = tmp_path / "run"
    cfg = small_config(
        corpus,
        out,
        eval_data=(f"proverbs={other}", f"again={other}"),
        join_documents=800,
        train_extra=(str(extra),),
    )
    result = train(cfg)
    card = json.loads((out / "final" / "training_card.json").read_text())
    held = card["heldout_bits_per_byte"]
    assert set(held) == {"proverbs", "again"} and held["proverbs"] == held["again"]
    assert 0 < held["proverbs"] < 20 and held["proverbs"] != card["val_bits_per_byte"]
    assert card["train_documents"] < 300 // 2  # the sentences were joined into passages
    assert card["val_documents"] > 0
    assert card["train_documents_dropped_as_heldout"] == 1
    assert result.val_bits_per_byte == pytest.approx(card["val_bits_per_byte"], abs=1e-4)
    # every source with its size as training read it; the model card parses (Hugging Face's
    # ModelCard) and names them, and, none being the repository's, gives no licence
    sizes = {s["name"]: (s["use"], s["documents"]) for s in card["sources"]}
    assert sizes == {
        "slice": ("training and validation", 300),
        "extra": ("training", 2),
        "proverbs": ("held-out evaluation", 80),
        "again": ("held-out evaluation", 80),
    }
    model_card = ModelCard.load(out / "final" / "README.md")
    assert (model_card.data.language, model_card.data.license) == ("ru", "unknown")
    assert [s["name"] for s in model_card.data.training_data] == ["slice", "extra"]
    assert [s["name"] for s in model_card.data.evaluation_data] == ["proverbs", "again"]
    results = {r.dataset_type: r.metric_value for r in model_card.data.eval_results}
    assert results["proverbs"] == held["proverbs"] and "## Evaluation" in model_card.text
