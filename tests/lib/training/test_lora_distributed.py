"""LoRA runs of two processes (torchrun on CPU, gloo): DDP, FSDP and DeepSpeed ZeRO-3 train the
same adapter as each other, export it whole from rank 0, and ZeRO-3 resumes from its state
checkpoint (about 45 s on 2 cores)."""

from __future__ import annotations

import json

import pytest
from peft import PeftModel
from transformers import AutoModelForCausalLM

from lib.data import bundled_documents, prepare_data
from lib.presets import DEFAULT_CHECKPOINT
from lib.tokenizer import load_tokenizer
from lib.training.evaluation import evaluate
from lib.training.lora import read_documents, split_heldout_tail
from tests.lib.training.test_distributed import torchrun

pytestmark = pytest.mark.slow

MODES = {
    "ddp": ["--mode", "baseline"],
    "fsdp": ["--mode", "fsdp"],
    "zero3": ["--mode", "deepspeed", "--zero-stage", "3"],
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "slice.txt"
    path.write_text("\n".join(bundled_documents()[:200]), encoding="utf-8")
    return path


def lora_args(corpus, out, *extra):
    return [
        "--init-from",
        str(DEFAULT_CHECKPOINT),
        "--lora-rank",
        "4",
        "--lr",
        "1e-2",
        "--data",
        str(corpus),
        "--output-dir",
        str(out),
        "--block-size",
        "32",
        "--batch-size",
        "2",
        "--warmup-steps",
        "1",
        "--eval-every",
        "0",
        "--save-every",
        "4",
        "--cache-dir",
        str(out.parent / "cache"),
        *extra,
    ]


@pytest.fixture(scope="module")
def runs(corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("lora-runs")
    for name, args in MODES.items():
        torchrun(*lora_args(corpus, root / name, *args, "--max-steps", "4"))
    return root


def card(path):
    return json.loads((path / "final" / "training_card.json").read_text(encoding="utf-8"))


def test_every_mode_trains_the_same_adapter_and_exports_it_whole(runs, corpus):
    cards = {name: card(runs / name) for name in MODES}
    for c in cards.values():
        assert c["world_size"] == 2 and c["steps"] == 4 and c["tokens_seen"] == 4 * 2 * 2 * 32
        assert c["val_loss"] < c["base_val_loss"]
    assert cards["fsdp"]["val_loss"] == pytest.approx(cards["ddp"]["val_loss"], abs=1e-3)
    assert cards["zero3"]["val_loss"] == pytest.approx(cards["ddp"]["val_loss"], abs=1e-3)
    # ZeRO-3's partitions were gathered: plain peft's model gives the figure the run measured
    train_docs, heldout = split_heldout_tail(read_documents(str(corpus)), 0.05)
    data = prepare_data("", load_tokenizer(DEFAULT_CHECKPOINT), 32, docs=(train_docs, heldout))
    base = AutoModelForCausalLM.from_pretrained(DEFAULT_CHECKPOINT)
    adapted = PeftModel.from_pretrained(base, runs / "zero3" / "final").eval()
    assert evaluate(adapted, data)["val_loss"] == pytest.approx(
        cards["zero3"]["val_loss"], abs=1e-4
    )


def test_zero3_resumes_a_lora_run_from_its_state_checkpoint(runs, corpus):
    torchrun(
        *lora_args(corpus, runs / "zero3", *MODES["zero3"], "--max-steps", "6", "--resume", "auto")
    )
    c = card(runs / "zero3")
    assert c["steps"] == 6 and c["resumed_from"].endswith("step-0000004")
