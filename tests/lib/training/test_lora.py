"""LoRA fine-tuning (`--lora-rank`, peft): a few steps on the committed default model write an
adapter directory that plain peft loads and that reproduces the run's own figures; `--merge`
writes a checkpoint that plain transformers loads and that computes base + adapter; bad settings,
data and bases fail before any step; a LoRA run resumes from its state checkpoint, on its own
base only."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import lib.training.loop
import train_distributed
from lib.checkpoint import checkpoint_sha256
from lib.data import bundled_documents, prepare_data
from lib.presets import DEFAULT_CHECKPOINT
from lib.tokenizer import load_tokenizer
from lib.training import train
from lib.training.config import ConfigError, TrainingConfig
from lib.training.evaluation import evaluate
from lib.training.lora import read_documents, split_heldout_tail

pytestmark = pytest.mark.slow

BASE = str(DEFAULT_CHECKPOINT)
PROBE = torch.tensor(
    [[0, 15, 230, 1200, 77, 3000, 41, 9, 512, 64]]
)  # token ids of the base's vocabulary


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "slice.txt"
    path.write_text("\n".join(bundled_documents()[:200]), encoding="utf-8")
    return path


def lora_config(corpus: Path, out: Path, **kw) -> TrainingConfig:
    settings = dict(
        init_from=BASE,
        lora_rank=4,
        data=str(corpus),
        output_dir=out,
        block_size=32,
        batch_size=2,
        max_steps=6,
        warmup_steps=1,
        lr=1e-2,
        eval_every=0,
        progress=False,
        report_to="none",
        cache_dir=Path(out).parent / "token-cache",
    )
    return TrainingConfig(**{**settings, **kw})


def card(final: Path) -> dict:
    return json.loads((final / "training_card.json").read_text(encoding="utf-8"))


def logits(model, ids=PROBE) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def base_model():
    return AutoModelForCausalLM.from_pretrained(BASE).eval()


@pytest.fixture(scope="module")
def adapter_run(corpus, tmp_path_factory):
    """Six steps from the default model, a state checkpoint at the end (for the resume test)."""
    out = tmp_path_factory.mktemp("runs") / "adapter"
    result = train(lora_config(corpus, out, save_every=6))
    return result, out


@pytest.fixture
def no_step_may_run(monkeypatch):
    def fail(*_args, **_kwargs):
        raise AssertionError("a training step ran")

    monkeypatch.setattr(lib.training.loop, "train_step", fail)


def test_the_adapter_loads_in_plain_peft_and_gives_the_runs_own_figures(adapter_run, corpus):
    result, out = adapter_run
    final = out / "final"
    assert result.checkpoint == final and result.steps == 6
    assert {"adapter_config.json", "adapter_model.safetensors", "training_card.json"} <= {
        p.name for p in final.iterdir()
    }
    assert not (final / "model.safetensors").exists()  # an adapter, not a checkpoint
    config = json.loads((final / "adapter_config.json").read_text(encoding="utf-8"))
    assert config["base_model_name_or_path"] == BASE and config["r"] == 4
    assert config["fan_in_fan_out"] is True  # GPT-2's Conv1D stores (in, out)
    assert set(config["target_modules"]) == {"c_attn", "c_proj", "c_fc"}

    # the adapter learned: its B matrices moved from zero, and base + adapter differs from the base
    weights = load_file(final / "adapter_model.safetensors")
    b_norms = [w.norm().item() for k, w in weights.items() if "lora_B" in k]
    assert len(b_norms) == 4 * 4 and min(b_norms) > 0  # c_attn, c_fc and both c_proj, 4 blocks
    base = base_model()
    base_logits = logits(base)
    adapted = PeftModel.from_pretrained(base, final).eval()
    assert not torch.allclose(logits(adapted), base_logits, atol=1e-3)

    # plain peft's model gives, on the held-out split, the figures the run measured in memory
    c = card(final)
    docs = read_documents(str(corpus))
    train_docs, heldout = split_heldout_tail(docs, 0.05)
    assert c["train_documents"] == len(train_docs) and c["val_documents"] == len(heldout) == 10
    data = prepare_data("", load_tokenizer(BASE), 32, docs=(train_docs, heldout))
    assert evaluate(adapted, data)["val_loss"] == pytest.approx(c["val_loss"], abs=1e-4)
    with adapted.disable_adapter():
        assert evaluate(adapted, data)["val_loss"] == pytest.approx(c["base_val_loss"], abs=1e-4)
    assert c["val_bits_per_byte_change"] == pytest.approx(
        c["val_bits_per_byte"] - c["base_val_bits_per_byte"], abs=2e-4
    )


def test_the_card_names_the_base_and_the_data_by_content(adapter_run, corpus):
    c = card(adapter_run[1] / "final")
    assert c["kind"] == "lora_adapter"
    assert c["base"]["path"] == BASE and c["base"]["sha256"] == checkpoint_sha256(BASE)
    weights = (DEFAULT_CHECKPOINT / "model.safetensors").read_bytes()
    assert c["base"]["weights_sha256"] == hashlib.sha256(weights).hexdigest()
    assert c["data"] == str(corpus)
    assert c["data_sha256"] == hashlib.sha256(corpus.read_bytes()).hexdigest()
    assert c["steps"] == 6 and c["tokens_seen"] == 6 * 2 * 32
    assert c["lora"]["rank"] == 4 and c["lora"]["alpha"] == 8  # alpha: twice the rank
    # rank 4 on 4 blocks: c_attn (128 -> 384), attn.c_proj and mlp.c_fc/c_proj
    per_block = 4 * (128 + 384) + 4 * (128 + 128) + 4 * (128 + 512) + 4 * (512 + 128)
    assert c["lora"]["trainable_parameters"] == 4 * per_block
    readme = (adapter_run[1] / "final" / "README.md").read_text(encoding="utf-8")
    assert "library_name: peft" in readme and str(c["val_bits_per_byte"]) in readme


def test_merge_writes_a_plain_checkpoint_that_computes_base_plus_adapter(adapter_run, corpus):
    out = adapter_run[1].parent / "merged"
    train(lora_config(corpus, out, save_every=6, merge=True))  # the same run, merged at the end
    merged_dir = out / "final"
    assert not (merged_dir / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    assert merged.lm_head.weight.data_ptr() == merged.transformer.wte.weight.data_ptr()
    assert not any("lora" in k for k in merged.state_dict())
    adapted = PeftModel.from_pretrained(base_model(), adapter_run[1] / "final").eval()
    torch.testing.assert_close(logits(merged), logits(adapted), rtol=1e-4, atol=1e-4)
    c = card(merged_dir)
    assert c["kind"] == "merged" and c["lora"]["merged"] is True
    assert c["base"]["sha256"] == checkpoint_sha256(BASE)
    assert load_tokenizer(merged_dir).get_vocab() == load_tokenizer(BASE).get_vocab()


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"lora_rank": 0}, "--lora-rank must be >= 1"),
        ({"lora_alpha": 0.0}, "--lora-alpha must be > 0"),
        ({"lora_targets": "c_attn,q_proj"}, "--lora-targets q_proj: the base model"),
        ({"lora_targets": "ln_1"}, "--lora-targets ln_1: selects LayerNorm layers"),
        ({"lora_targets": "lm_head"}, "--lora-targets lm_head: selects Linear layers"),
        ({"lora_rank": None}, "--init-from needs --lora-rank"),
        ({"init_from": "/nonexistent"}, "--init-from /nonexistent: not a checkpoint"),
        ({"vocab_size": 512}, "--vocab-size: a LoRA run takes its tokenizer"),
    ],
)
def test_bad_settings_fail_before_any_step(corpus, tmp_path, no_step_may_run, settings, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        train(lora_config(corpus, tmp_path / "run", **settings))
    assert not (tmp_path / "run" / "final").exists()


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.txt", "", "the file is empty"),
        ("blank.txt", "\n  \n", "the file is empty"),
        ("notext.jsonl", '{"text": "Первая строка."}\n{"body": "x"}\n', "line 2: expected a JSON"),
        ("notjson.jsonl", '{"text": "Первая."}\nне JSON\n', "line 2: expected a JSON"),
        ("one.txt", "Один документ.\n", "too few to hold out"),
        ("short.txt", "Кошка сидит на окне.\n" * 60, "fewer than one block .* give more text"),
    ],
)
def test_bad_data_fails_before_any_step(tmp_path, no_step_may_run, name, content, message):
    data = tmp_path / name
    data.write_text(content, encoding="utf-8")
    with pytest.raises(ConfigError, match=message):
        train(lora_config(data, tmp_path / "run"))


def test_the_command_line_says_what_is_wrong_and_exits_2(corpus, tmp_path, capsys):
    args = ["--init-from", BASE, "--data", str(corpus), "--output-dir", str(tmp_path)]
    assert train_distributed.main([*args, "--lora-rank", "0", "--lora-alpha", "-1"]) == 2
    err = capsys.readouterr().err
    assert "--lora-rank must be >= 1" in err and "--lora-alpha must be > 0" in err
    # a target the base lacks is found when the base loads, still before any step
    assert train_distributed.main([*args, "--lora-rank", "2", "--lora-targets", "wq"]) == 2
    assert "--lora-targets wq: the base model" in capsys.readouterr().err


def test_text_is_read_by_extension_or_by_content(tmp_path):
    jsonl = tmp_path / "notes.data"  # no known extension: JSON lines by content
    jsonl.write_text('{"text": "Первый."}\n\n{"text": "Второй.", "id": 2}\n', encoding="utf-8")
    assert read_documents(str(jsonl)) == ["Первый.", "Второй."]
    text = tmp_path / "notes.md"
    text.write_text("# Заголовок\n\nАбзац текста.\n", encoding="utf-8")
    assert read_documents(str(text)) == ["# Заголовок", "Абзац текста."]
    docs = [f"документ {i}" for i in range(40)]
    assert split_heldout_tail(docs, 0.05) == (docs[:38], docs[38:])


def test_a_lora_run_resumes_from_its_state_on_its_own_base_only(
    adapter_run, corpus, tmp_path, monkeypatch
):
    out = tmp_path / "resumed"
    shutil.copytree(adapter_run[1] / "checkpoints", out / "checkpoints")
    # another base (one weight changed) is refused before any step
    other = tmp_path / "other-base"
    shutil.copytree(DEFAULT_CHECKPOINT, other)
    weights = load_file(other / "model.safetensors")
    weights["transformer.ln_f.bias"] = weights["transformer.ln_f.bias"] + 0.01
    save_file(weights, other / "model.safetensors", metadata={"format": "pt"})
    steps = []
    real_step = lib.training.loop.train_step
    monkeypatch.setattr(
        lib.training.loop, "train_step", lambda *a: steps.append(1) or real_step(*a)
    )
    with pytest.raises(ConfigError, match="resume with the same base"):
        train(lora_config(corpus, out, init_from=str(other), max_steps=9, resume="auto"))
    assert not steps
    result = train(lora_config(corpus, out, max_steps=9, resume="auto"))
    assert result.steps == 9 and len(steps) == 3  # steps 7 to 9 only
    c = card(out / "final")
    assert c["steps"] == 9 and c["resumed_from"].endswith("step-0000006")
    assert c["tokens_seen"] == 9 * 2 * 32
