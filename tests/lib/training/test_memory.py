"""The per-device memory estimate: the model is built on the meta device (accelerate), so even the
1B preset costs nothing, and the sharding rules divide what each mode shards."""

from __future__ import annotations

import resource

import pytest

from lib.modeling import build_model, count_parameters
from lib.presets import get_preset
from lib.training.config import TrainingConfig
from lib.training.memory import count_meta_parameters, estimate_memory


def test_meta_count_equals_the_real_model():
    real = count_parameters(build_model(get_preset("tiny")))
    assert count_meta_parameters(TrainingConfig(preset="tiny"))[0] == real


def test_the_1b_preset_is_counted_without_allocating_it():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    n, _ = count_meta_parameters(TrainingConfig(preset="gpt2-1b"))
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert n == get_preset("gpt2-1b").approx_parameters()
    assert grown_mib < 500, grown_mib  # its fp32 weights alone would be ~4 GiB


@pytest.mark.parametrize(
    "mode,stage,sharded",
    [
        ("baseline", None, set()),
        ("deepspeed", 1, {"optimizer"}),
        ("deepspeed", 2, {"optimizer", "gradients"}),
        ("deepspeed", 3, {"optimizer", "gradients", "weights"}),
        ("fsdp", None, {"optimizer", "gradients", "weights"}),
    ],
)
def test_each_mode_shards_what_it_shards(mode, stage, sharded):
    cfg = TrainingConfig(preset="gpt2-124m", mode=mode, zero_stage=stage or 2)
    one, four = estimate_memory(cfg, world_size=1), estimate_memory(cfg, world_size=4)
    n = one.parameters
    assert (one.weights, one.gradients, one.optimizer) == (4 * n, 4 * n, 8 * n)
    for part in ("weights", "gradients", "optimizer"):
        expected = getattr(one, part) / 4 if part in sharded else getattr(one, part)
        assert getattr(four, part) == pytest.approx(expected)
    assert four.activations == one.activations and four.logits == one.logits


def test_checkpointing_and_bf16_cut_activations():
    base = TrainingConfig(preset="gpt2-124m", batch_size=8)
    full = estimate_memory(base).activations
    assert estimate_memory(TrainingConfig(**{**vars(base), "precision": "bf16"})).activations == (
        pytest.approx(full / 2)
    )
    checkpointed = TrainingConfig(**{**vars(base), "gradient_checkpointing": True})
    assert estimate_memory(checkpointed).activations < full / 5
    assert "total" in estimate_memory(base).table()


@pytest.mark.slow  # the training CLI in a fresh interpreter
def test_the_cli_prints_the_estimate_and_trains_nothing(tmp_path):
    import subprocess
    import sys

    from lib.presets import REPO_ROOT

    out = tmp_path / "run"
    r = subprocess.run(
        [
            sys.executable,
            str(REPO_ROOT / "train_distributed.py"),
            "--preset",
            "gpt2-124m",
            "--mode",
            "fsdp",
            "--output-dir",
            str(out),
            "--estimate-memory",
            "4",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr
    assert "4 device(s)" in r.stdout and "optimizer states" in r.stdout and "total" in r.stdout
    assert not out.exists()
