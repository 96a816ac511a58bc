"""Training: the optimizers and LR schedules (lib/training), and real runs of the CLI
(train_distributed.py): its arguments, its checks and a small run to a loadable checkpoint."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from lib.data import DataSplits, bundled_documents, tokenize_and_pack
from lib.inference import GenerationParams, InferenceService
from lib.modeling import build_model
from lib.presets import PRESETS, REPO_ROOT
from lib.tokenizer import load_tokenizer, token_byte_lengths
from lib.training.config import native_bf16
from lib.training.evaluation import evaluate, heldout_figures
from lib.training.optim import Muon, build_optimizer
from lib.training.schedulers import lr_multiplier
from tests.helpers import CHECKPOINT


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


def test_muon_is_torchs_with_newton_schulz_in_fp32_where_bf16_is_emulated():
    start = [torch.randn(64, 32, generator=torch.Generator().manual_seed(0)), torch.randn(32, 96)]

    def three_steps(cls, **kwargs):
        params = [torch.nn.Parameter(t.clone()) for t in start]
        opt = cls(params, lr=0.01, weight_decay=0.1, adjust_lr_fn="match_rms_adamw", **kwargs)
        grads = torch.Generator().manual_seed(1)
        for _ in range(3):
            for p in params:
                p.grad = torch.randn(p.shape, generator=grads)
            opt.step()
        return params, opt

    ref, ref_opt = three_steps(torch.optim.Muon)
    bf16, bf16_opt = three_steps(Muon, ns_dtype=torch.bfloat16)
    fp32, _ = three_steps(Muon, ns_dtype=torch.float32)
    assert all(
        torch.equal(a, b) for a, b in zip(ref, bf16, strict=True)
    )  # torch's update, bit for bit
    assert all(
        torch.allclose(a, b, atol=2e-3) and not torch.equal(a, b)
        for a, b in zip(ref, fp32, strict=True)
    )
    # the same state: torch's Muon resumes from ours and ours from torch's
    ref_opt.load_state_dict(bf16_opt.state_dict())
    bf16_opt.load_state_dict(ref_opt.state_dict())
    _, auto = three_steps(Muon)
    assert auto.ns_dtype == (torch.bfloat16 if native_bf16("cpu") else torch.float32)


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
    # the whole run's throughput, evaluations included (wall_clock_s is rounded to 0.1 s)
    mean, wall = card["throughput"]["mean_tokens_per_s"], card["wall_clock_s"]
    assert (
        card["tokens_seen"] / (wall + 0.06) <= mean <= card["tokens_seen"] / max(wall - 0.06, 0.01)
    )
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


def test_evaluate_splits_off_what_predicting_the_end_of_each_text_costs():
    """`evaluate` reports, per held-out set, the bits/byte spent on the end-of-text targets; the
    same figure computed by hand from the model's logits."""
    tokenizer = load_tokenizer(CHECKPOINT)
    model = AutoModelForCausalLM.from_pretrained(CHECKPOINT).eval()
    texts = ["Без труда не выловишь и рыбку из пруда.", "Тише едешь — дальше будешь."] * 20
    blocks = tokenize_and_pack(texts, tokenizer, 64)
    sizes = torch.tensor(token_byte_lengths(tokenizer), dtype=torch.float64)
    data = DataSplits(train=blocks, val=blocks, target_bytes=sizes, heldout={"p": blocks})
    out = evaluate(model, data)

    batch = blocks.slice(0, len(blocks))
    with torch.no_grad():
        logits = model(batch[:, :-1]).logits.float()
    targets = batch[:, 1:]
    nll = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
    ends = targets.flatten() == tokenizer.eos_token_id
    assert ends.sum() >= 30  # the texts end inside the blocks
    nbytes = sizes[targets].sum().item()
    per_byte = 1 / (math.log(2) * nbytes)
    assert out["heldout_end_of_text/p"] == pytest.approx(
        nll[ends].sum().item() * per_byte, rel=1e-3
    )
    assert heldout_figures(out)["p"] == pytest.approx(nll.sum().item() * per_byte, rel=1e-3)
    assert 0 < out["heldout_end_of_text/p"] < heldout_figures(out)["p"]
