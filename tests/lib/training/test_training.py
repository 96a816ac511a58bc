"""Presets, tokenizer, data, schedules, and a real training run through the CLI."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lib.config import PRESETS, REPO_ROOT
from lib.data import (
    bits_per_byte,
    bundled_documents,
    clean_context,
    load_documents,
    prepare_data,
    prepare_streaming_data,
    split_documents,
    tokenize_and_pack,
)
from lib.inference import GenerationParams, InferenceService
from lib.modeling import build_model, count_parameters
from lib.tokenizer import load_tokenizer, token_byte_lengths, train_tokenizer
from lib.training.optim import build_optimizer
from lib.training.schedulers import lr_multiplier

# GPT-2 sizes as published by OpenAI / Hugging Face (tied embeddings counted once)
EXPECTED_PARAMETERS = {
    "tiny": 3_401_856,
    "gpt2-124m": 124_439_808,
    "gpt2-350m": 354_823_168,
    "gpt2-774m": 774_030_080,
    "gpt2-1.5b": 1_557_611_200,
    "gpt2-1b": 1_019_221_504,
}


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_parameter_count(name):
    preset = PRESETS[name]
    with torch.device("meta"):  # no memory for the big ones
        model = build_model(preset)
    assert count_parameters(model) == EXPECTED_PARAMETERS[name] == preset.approx_parameters()
    assert preset.n_embd % preset.n_head == 0


def test_gpt2_1b_vocabulary_is_padded():
    assert (
        PRESETS["gpt2-1b"].vocab_size % 128 == 0
        and 50_000 <= PRESETS["gpt2-1b"].vocab_size <= 64_000
    )


def test_clean_context_drops_cut_words_and_fixes_punctuation():
    assert (
        clean_context("ло сказал он ,", " пошёл", " домой . Потом спа")
        == "сказал он, пошёл домой. Потом"
    )


def test_bundled_corpus_is_real_russian_and_split_is_deterministic():
    docs = bundled_documents()
    assert len(docs) > 5000 and 1_400_000 < sum(map(len, docs)) < 1_800_000
    train, val = split_documents(docs, 0.05)
    train2, val2 = split_documents(list(reversed(docs)), 0.05)
    assert set(val) == set(val2) and not set(train) & set(val)
    assert 0.03 < len(val) / len(docs) < 0.07


def test_local_txt_and_jsonl_sources(tmp_path):
    (tmp_path / "a.txt").write_text("первая строка\n\nвторая строка\n", encoding="utf-8")
    (tmp_path / "b.jsonl").write_text(
        '{"text": "третья"}\n{"text": "четвёртая"}\n', encoding="utf-8"
    )
    assert load_documents(str(tmp_path)) == [
        "первая строка",
        "вторая строка",
        "третья",
        "четвёртая",
    ]
    (tmp_path / "bad.jsonl").write_text("not json\n", encoding="utf-8")
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        load_documents(str(tmp_path / "bad.jsonl"))


def test_tokenizer_roundtrip_saves_for_autotokenizer(tmp_path):
    docs = bundled_documents()[:500]
    tok = train_tokenizer(docs, vocab_size=600)
    assert len(tok) == 600
    tok.save_pretrained(tmp_path)
    auto = AutoTokenizer.from_pretrained(str(tmp_path))
    text = "Привет, мир! Ёлка 2026 — ok"
    assert auto.decode(auto(text)["input_ids"]) == text
    assert auto.eos_token == "<|endoftext|>"
    # bits per byte needs the exact byte length of every token
    lengths = token_byte_lengths(load_tokenizer(tmp_path))
    assert sum(lengths[i] for i in auto(text)["input_ids"]) == len(text.encode())


def test_packing_predicts_every_token_once():
    docs = bundled_documents()[:50]
    tok = train_tokenizer(docs, vocab_size=400)
    blocks = tokenize_and_pack(docs, tok, block_size=32)
    b = blocks.blocks
    assert b.shape[1] == 33
    assert torch.equal(b[:-1, -1], b[1:, 0])  # one-token overlap: no target skipped or repeated
    assert (b == tok.eos_token_id).any()


def test_token_cache_is_memory_mapped_and_keyed_by_tokenizer_and_data(tmp_path):
    docs = bundled_documents()[:80]
    tok = train_tokenizer(docs, vocab_size=400)
    first = tokenize_and_pack(docs, tok, block_size=32, cache_dir=tmp_path)
    files = list(tmp_path.glob("tokens-*.uint16"))
    assert len(files) == 1 and first.stream.dtype == np.uint16
    again = tokenize_and_pack(docs, tok, block_size=32, cache_dir=tmp_path)
    assert isinstance(again.stream, np.memmap) and torch.equal(again.blocks, first.blocks)
    assert torch.equal(
        again.blocks, tokenize_and_pack(docs, tok, block_size=32).blocks
    )  # same as uncached
    tokenize_and_pack(docs[:40], tok, block_size=32, cache_dir=tmp_path)  # other data, other key
    tokenize_and_pack(
        docs, train_tokenizer(docs, vocab_size=300), block_size=32, cache_dir=tmp_path
    )
    assert len(list(tmp_path.glob("tokens-*"))) == 3


def test_streaming_gives_the_same_blocks_as_loading(tmp_path):
    docs = bundled_documents()[:400]
    src = tmp_path / "corpus.jsonl"
    src.write_text(
        "\n".join(json.dumps({"text": d}, ensure_ascii=False) for d in docs), encoding="utf-8"
    )
    tok = train_tokenizer(docs, vocab_size=400)
    loaded = prepare_data(str(src), tok, block_size=32, val_fraction=0.05)
    streamed, _, counts = prepare_streaming_data(str(src), tok, 32, 0.05, tmp_path / "cache")
    assert torch.equal(streamed.train.blocks, loaded.train.blocks)
    assert torch.equal(streamed.val.blocks, loaded.val.blocks)
    assert streamed.train.n_bytes == loaded.train.n_bytes and sum(counts) == len(docs)
    again, _, _ = prepare_streaming_data(
        str(src), tok, 32, 0.05, tmp_path / "cache"
    )  # cached: no second pass
    assert isinstance(again.train.stream, np.memmap)


def test_token_budget_sets_the_step_count():
    from train_distributed import build_parser, config_from_args, parse_count

    assert (
        parse_count("2.5M") == 2_500_000
        and parse_count("300k") == 300_000
        and parse_count("7") == 7
    )
    args = build_parser().parse_args(
        ["--max-tokens", "1M", "--batch-size", "2", "--grad-accum", "2"]
    )
    assert config_from_args(args).max_steps == -(-1_000_000 // (2 * 2 * 256))


def test_muon_takes_the_block_matrices_and_adamw_the_rest():
    model = build_model(PRESETS["tiny"], vocab_size=300, seed=0)
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.1, name="muon")
    muon = {id(p) for g in opt.muon.param_groups for p in g["params"]}
    adamw = {id(p) for g in opt.adamw.param_groups for p in g["params"]}
    names = {id(p): n for n, p in model.named_parameters()}
    assert muon.isdisjoint(adamw) and muon | adamw == set(names)  # each parameter once (tied wte)
    assert sorted({names[i].split(".")[-2] for i in muon}) == ["c_attn", "c_fc", "c_proj"]
    assert all(names[i].startswith("transformer.h.") for i in muon)
    assert {id(model.transformer.wte.weight), id(model.transformer.wpe.weight)} <= adamw
    # one LR schedule drives both optimizers
    for group in opt.param_groups:
        group["lr"] = 5e-4
    assert {g["lr"] for g in opt.muon.param_groups + opt.adamw.param_groups} == {5e-4}
    with pytest.raises(ValueError, match="unknown optimizer"):
        build_optimizer(model, lr=1e-3, weight_decay=0.1, name="sgd")


def test_bits_per_byte_formula():
    assert bits_per_byte(math.log(2) * 100, 100) == pytest.approx(1.0)


@pytest.mark.parametrize(
    "schedule,step,expected",
    [
        ("cosine", 0, 0.1),
        ("cosine", 9, 1.0),
        ("cosine", 10, 1.0),
        ("cosine", 55, 0.5),
        ("cosine", 100, 0.0),
        ("linear", 55, 0.5),
        ("linear", 100, 0.0),
        ("constant", 80, 1.0),
        ("wsd", 50, 1.0),
        ("wsd", 80, 1.0),
        ("wsd", 91, 0.5),
        ("wsd", 100, 0.0),
    ],
)
def test_schedule_values(schedule, step, expected):
    m = lr_multiplier(step, schedule=schedule, warmup_steps=10, max_steps=100)
    assert m == pytest.approx(expected, abs=1e-6)


def test_time_fraction_anneals_a_time_limited_run():
    early = lr_multiplier(20, schedule="cosine", warmup_steps=10, max_steps=1000, time_fraction=0.0)
    late = lr_multiplier(20, schedule="cosine", warmup_steps=10, max_steps=1000, time_fraction=1.0)
    assert early > 0.99 and late == pytest.approx(0.0)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO_ROOT / "train_distributed.py"), *args],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=600,
    )


@pytest.mark.parametrize(
    "args,message",
    [
        (["--batch-size", "0"], "--batch-size"),
        (["--warmup-steps", "50", "--max-steps", "10"], "--warmup-steps"),
        (["--block-size", "4096"], "--block-size"),
        (["--time-limit", "soon"], "bad duration"),
        (["--preset", "gpt5"], "invalid choice"),
    ],
)
def test_bad_cli_arguments_fail_fast(args, message):
    r = run_cli(*args)
    assert r.returncode != 0 and message in r.stderr + r.stdout


@pytest.mark.slow
def test_training_smoke_produces_loadable_checkpoint(tmp_path):
    data = tmp_path / "slice.txt"
    data.write_text("\n".join(bundled_documents()[:400]), encoding="utf-8")
    out = tmp_path / "run"
    r = run_cli(
        "--data",
        str(data),
        "--output-dir",
        str(out),
        "--vocab-size",
        "512",
        "--block-size",
        "64",
        "--batch-size",
        "4",
        "--max-steps",
        "6",
        "--warmup-steps",
        "2",
        "--eval-every",
        "3",
        "--no-progress",
    )
    assert r.returncode == 0, r.stderr[-2000:]
    ckpt = out / "final"
    card = json.loads((ckpt / "training_card.json").read_text(encoding="utf-8"))
    assert card["steps"] == 6 and card["tokens_seen"] == 6 * 4 * 64
    assert card["data"] == str(data) and card["preset"] == "tiny"
    assert math.isfinite(card["val_loss"]) and 0 < card["val_bits_per_byte"] < 10
    # plain transformers loads it, and the service generates from it
    AutoModelForCausalLM.from_pretrained(str(ckpt))
    AutoTokenizer.from_pretrained(str(ckpt))
    service = InferenceService.from_checkpoint(ckpt)
    assert (
        service.generate("Привет", GenerationParams(max_new_tokens=4, seed=0)).completion_tokens
        >= 1
    )
    # no temporary directory left behind by the atomic save
    assert sorted(p.name for p in out.iterdir()) == ["final"]


@pytest.mark.parametrize(
    "args,message",
    [
        (["--bf16", "--fp16"], "not allowed with argument"),
        (["--fp16", "--device", "cpu"], "--fp16 needs a CUDA device"),
        (["--resume", "/nonexistent/step-1"], "not a training-state checkpoint"),
        (["--resume", "auto", "--vocab-size", "512"], "--resume takes the tokenizer"),
        (["--time-limit", "20s"], "--time-limit must leave"),
        (["--save-total-limit", "0"], "--save-total-limit"),
        (["--zero-stage", "3"], "--zero-stage needs --mode deepspeed"),
        (["--mode", "deepspeed", "--compile"], "--compile is not supported"),
        (["--mode", "fsdp", "--optimizer", "muon"], "--optimizer muon works in --mode baseline"),
    ],
)
def test_bad_cli_combinations_fail_before_any_work(args, message):
    r = run_cli(*args)
    assert r.returncode != 0 and message in r.stderr + r.stdout
