"""Training settings: one dataclass holds every setting's default, help and checks; the CLI is
generated from it, and library callers get the same defaults and the same validation."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from lib.cli import cli_flag, parse_count, parse_duration
from lib.presets import REPO_ROOT
from lib.training.config import ConfigError, TrainingConfig, launched_world_size, native_bf16
from train_distributed import build_parser, config_from_args


def parse(*argv: str, environ: dict | None = None):
    return build_parser(environ={} if environ is None else environ).parse_args(list(argv))


def test_cli_without_arguments_is_the_dataclass_default_run():
    parsed, default = TrainingConfig.from_args(parse()), TrainingConfig()
    for f in dataclasses.fields(TrainingConfig):
        assert getattr(parsed, f.name) == getattr(default, f.name), f.name
    resolved, default_resolved = config_from_args(parse(), world_size=1), default.resolved()
    for f in dataclasses.fields(TrainingConfig):
        assert getattr(resolved, f.name) == getattr(default_resolved, f.name), f.name


def test_the_chosen_defaults():
    """The CLI's historical values (what docs/train.md and the Makefile describe)."""
    c = TrainingConfig()
    assert (c.batch_size, c.max_steps, c.min_lr_ratio, c.lr) == (8, 900, 0.1, 3e-3)
    assert (c.output_dir, c.cache_dir) == (Path("runs/baseline"), Path(".cache/tokens"))
    assert (c.warmup_steps, c.eval_every, c.zero_stage) == (None, None, None)
    r = c.resolved()
    assert (r.warmup_steps, r.eval_every, r.zero_stage, r.max_steps) == (50, 150, None, 900)


@pytest.mark.parametrize(
    "max_steps,warmup,eval_every",
    [(6, 0, 1), (5, 0, 0), (100, 10, 16), (900, 50, 150), (100_000, 50, 150)],
)
def test_warmup_and_eval_every_follow_the_run_length(max_steps, warmup, eval_every):
    r = config_from_args(parse("--max-steps", str(max_steps)), world_size=1)
    assert (r.max_steps, r.warmup_steps, r.eval_every) == (max_steps, warmup, eval_every)
    assert TrainingConfig(max_steps=max_steps).resolved() == r


def test_explicit_settings_win_and_resolving_twice_changes_nothing():
    r = TrainingConfig(max_steps=6, warmup_steps=2, eval_every=0).resolved()
    assert (r.warmup_steps, r.eval_every) == (2, 0)
    assert r.resolved() == r
    assert TrainingConfig(mode="deepspeed").resolved().zero_stage == 2
    assert TrainingConfig(mode="deepspeed", zero_stage=3).resolved().zero_stage == 3


def test_precision_auto_is_bf16_only_where_the_cpu_computes_in_it():
    import torch

    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert native_bf16("cpu") is native and native_bf16("mps") is False
    auto = config_from_args(parse("--precision", "auto", "--device", "cpu"))
    assert auto.precision == ("bf16" if native else "fp32")
    assert auto.resolved() == auto
    assert TrainingConfig(precision="bf16", device="cpu").resolved().precision == "bf16"  # asked


def test_token_budget_is_shared_by_the_processes():
    one = TrainingConfig(max_tokens=1_000_000, batch_size=2, grad_accum=2)
    assert one.resolved(world_size=1).max_steps == -(-1_000_000 // (2 * 2 * 256))
    assert one.resolved(world_size=2).max_steps == -(-1_000_000 // (2 * 2 * 256 * 2))
    assert config_from_args(parse("--max-tokens", "1M", "--batch-size", "2"), 4).max_steps == (
        -(-1_000_000 // (2 * 256 * 4))
    )


def test_validate_lists_every_problem_for_library_callers():
    with pytest.raises(ConfigError) as e:
        TrainingConfig(batch_size=0, lr=0, zero_stage=3, preset="gpt5").validate()
    assert isinstance(e.value, ValueError)
    assert len(e.value.problems) == 4
    for needle in ("--batch-size", "--lr", "--zero-stage needs --mode deepspeed", "--preset"):
        assert needle in str(e.value)
    with pytest.raises(ConfigError, match="--warmup-steps must be in"):
        TrainingConfig(max_steps=10, warmup_steps=50).resolved()
    with pytest.raises(ConfigError, match="--block-size exceeds the tiny context of 256"):
        TrainingConfig(block_size=4096).validate()
    assert TrainingConfig().problems() == []
    with pytest.raises(
        ConfigError, match=r"width \(200\) must be a multiple of the head count \(3\)"
    ):
        TrainingConfig(n_embd=200, n_head=3).validate()
    with pytest.raises(ConfigError, match="--n-layer must be >= 1"):
        TrainingConfig(n_layer=0).validate()
    for short in (96, 256, 0):  # must divide the context (256) and be shorter
        with pytest.raises(ConfigError, match=r"--short-context must be shorter than .*\(256\)"):
            TrainingConfig(short_context=short).validate()
    assert TrainingConfig(block_size=128, short_context=64).problems() == []
    with pytest.raises(ConfigError, match=r"--short-context-until must be in \(0, 1\]"):
        TrainingConfig(short_context=64, short_context_until=0).validate()
    for sized in (dict(vocab_size=300), dict(tokenizer="t")):  # char sizes its own vocabulary
        with pytest.raises(ConfigError, match="--tokenizer-type char sizes its own vocabulary"):
            TrainingConfig(tokenizer_type="char", **sized).validate()
    assert TrainingConfig.from_args(parse("--tokenizer-type", "char")).tokenizer_type == "char"


def test_the_preset_shape_can_be_overridden():
    assert TrainingConfig().model_preset() == TrainingConfig(n_layer=None).model_preset()
    shape = TrainingConfig(n_layer=6, n_embd=256).model_preset()
    assert (shape.name, shape.n_layer, shape.n_embd, shape.n_head) == ("tiny-6x256", 6, 256, 4)
    assert (shape.n_positions, shape.vocab_size) == (256, 8192)  # the rest stays the preset's


def test_library_train_validates_before_any_work(tmp_path):
    from lib.training import train

    out = tmp_path / "run"
    with pytest.raises(ConfigError, match="--block-size"):
        train(TrainingConfig(block_size=4096, output_dir=out, data=str(tmp_path / "missing")))
    assert not out.exists()


def test_every_existing_flag_still_works():
    c = TrainingConfig.from_args(
        parse(
            *("--time-limit", "11m30s", "--max-tokens", "2.5M", "--bf16", "--threads", "3"),
            *("--no-progress", "--cache-dir", "none", "--mode", "deepspeed", "--zero-stage", "3"),
            *("--resume", "auto", "--streaming", "--gradient-checkpointing", "--compile"),
            *("--peak-tflops", "2", "--report-to", "tensorboard", "--save-every", "5"),
            *("--save-total-limit", "2", "--sample-every", "7", "--run-name", "x", "--seed", "1"),
            *("--output-dir", "o", "--data", "d.txt", "--scheduler", "wsd", "--dropout", "0.2"),
            *("--optimizer", "muon", "--lr", "1e-3", "--min-lr-ratio", "0", "--device", "cpu"),
            *(
                "--weight-decay",
                "0",
                "--warmup-steps",
                "3",
                "--eval-every",
                "4",
                "--max-steps",
                "9",
            ),
            *("--grad-accum", "2", "--batch-size", "4", "--block-size", "64", "--preset", "tiny"),
        )
    )
    expected = dict(
        time_limit_s=690.0,
        max_tokens=2_500_000,
        precision="bf16",
        num_threads=3,
        progress=False,
        cache_dir=None,
        mode="deepspeed",
        zero_stage=3,
        resume="auto",
        streaming=True,
        gradient_checkpointing=True,
        compile=True,
        peak_tflops=2.0,
        report_to="tensorboard",
        save_every=5,
        save_total_limit=2,
        sample_every=7,
        run_name="x",
        seed=1,
        output_dir=Path("o"),
        data="d.txt",
        scheduler="wsd",
        dropout=0.2,
        optimizer="muon",
        lr=1e-3,
        min_lr_ratio=0.0,
        device="cpu",
        weight_decay=0.0,
        warmup_steps=3,
        eval_every=4,
        max_steps=9,
        grad_accum=2,
        batch_size=4,
        block_size=64,
    )
    assert {k: getattr(c, k) for k in expected} == expected
    assert TrainingConfig.from_args(parse("--fp16")).precision == "fp16"
    assert TrainingConfig.from_args(parse("--cache-dir", "c")).cache_dir == Path("c")
    assert (
        TrainingConfig.from_args(parse("--tokenizer", "t", "--vocab-size", "300")).tokenizer == "t"
    )


def test_every_field_documents_itself_and_flags_are_unique():
    flags = [cli_flag(f) for f in dataclasses.fields(TrainingConfig) if f.metadata.get("cli")]
    assert len(flags) == len(set(flags)) == len(dataclasses.fields(TrainingConfig)) - 1  # extra
    for f in dataclasses.fields(TrainingConfig):
        assert f.name == "extra" or f.metadata["help"], f.name


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--bf16", "--fp16"], "not allowed with argument"),
        (["--time-limit", "soon"], "bad duration"),
        (["--max-tokens", "lots"], "bad count"),
        (["--preset", "gpt5"], "invalid choice"),
    ],
)
def test_bad_flags_are_argparse_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        parse(*argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_command_line_parsers():
    with pytest.raises(ValueError, match="bad duration"):
        parse_duration("soon")
    assert parse_duration("1h2m3s") == 3723 and parse_duration("600") == 600
    assert parse_count("10B") == 10**10 and parse_count("2.5M") == 2_500_000


def test_the_environment_is_read_at_the_edge():
    assert TrainingConfig.from_args(parse()).wandb_mode == "offline"
    keyed = TrainingConfig.from_args(parse(environ={"WANDB_API_KEY": "k", "WANDB_PROJECT": "p"}))
    assert (keyed.wandb_mode, keyed.wandb_project) == ("online", "p")
    env = {"WANDB_API_KEY": "secret-key-123", "WANDB_MODE": "disabled"}
    assert TrainingConfig.from_args(parse(environ=env)).wandb_mode == "disabled"
    flagged = parse("--wandb-mode", "offline", "--wandb-project", "q", environ=env)
    assert (flagged.wandb_mode, flagged.wandb_project) == ("offline", "q")
    assert "secret-key-123" not in str(
        TrainingConfig.from_args(parse(environ=env)).to_dict()
    )  # no secrets
    # the ONNX exporter's interpreter: the CLI reads the variable, the flag wins, lib never reads it
    named = {"ML_ONNX_EXPORTER_PYTHON": "/opt/onnx/bin/python"}
    assert (
        TrainingConfig.from_args(parse(environ=named)).onnx_exporter_python
        == named["ML_ONNX_EXPORTER_PYTHON"]
    )
    flag = parse("--onnx-exporter-python", "/x/python", environ=named)
    assert TrainingConfig.from_args(flag).onnx_exporter_python == "/x/python"
    assert TrainingConfig.from_args(parse()).onnx_exporter_python is None
    assert launched_world_size({"WORLD_SIZE": "4"}) == 4 and launched_world_size({}) == 1


def test_library_code_never_reads_the_onnx_exporters_variable(monkeypatch, tmp_path):
    from lib.onnx_exporter import ExportError, exporter_python

    missing = str(tmp_path / "python")
    monkeypatch.setenv("ML_ONNX_EXPORTER_PYTHON", missing)
    try:
        assert exporter_python() != missing  # .venv-onnx's, or this one with the exporter
    except ExportError as e:  # no exporter installed at all
        assert missing not in str(e)
    with pytest.raises(ExportError, match="does not exist"):
        exporter_python(missing)  # named by the caller (a command line's flag)
    bad = TrainingConfig(export_onnx="fp32", onnx_exporter_python=missing).problems()
    assert any("--onnx-exporter-python" in p for p in bad)


def run_python(code: str) -> str:
    r = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout.strip()


def test_the_cli_parses_and_checks_without_importing_torch():
    assert (
        run_python(
            "import train_distributed, sys; train_distributed.build_parser(); "
            "print('torch' in sys.modules)"
        )
        == "False"
    )
    code = (
        "import sys, contextlib, io, train_distributed as t\n"
        "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
        "    t.main(['--help'])\n"
        "rc = t.main(['--batch-size', '0', '--max-steps', '6'])\n"
        "print(rc, 'torch' in sys.modules, 'transformers' in sys.modules)"
    )
    assert run_python(code).splitlines()[-1] == "2 False False"
    assert run_python("import lib.training, sys; print('torch' in sys.modules)") == "False"


def test_named_held_out_sets_and_joined_documents(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("Тише едешь — дальше будешь.\n", encoding="utf-8")
    cfg = TrainingConfig.from_args(parse("--eval-data", f"a={f}", "--eval-data", f"b={tmp_path}"))
    assert cfg.eval_data == (f"a={f}", f"b={tmp_path}") and cfg.problems() == []
    assert TrainingConfig.from_args(parse()).eval_data == ()
    bad = TrainingConfig(eval_data=("nopath", f"a={tmp_path / 'missing'}", f"c={f}", f"c={f}"))
    found = bad.problems()
    assert any("expected NAME=PATH" in p for p in found)
    assert any("--eval-data a: no" in p for p in found)
    assert any("names must differ" in p for p in found)
    assert TrainingConfig(join_documents=-1).problems() == ["--join-documents must be >= 0"]

    from lib.data import join_documents

    docs = ["аб", "вг", "д" * 10, "е"]
    assert join_documents(docs, 6) == ["аб вг", "д" * 10, "е"]
    assert join_documents(docs, 0) == docs
    assert " ".join(join_documents(docs, 3)) == " ".join(docs)  # nothing lost, order kept
