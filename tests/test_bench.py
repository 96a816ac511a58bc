"""The benchmark scripts still run (tiny settings; their numbers are not checked here)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from lib.config import REPO_ROOT

pytestmark = pytest.mark.slow  # subprocesses that load the model


def run_script(*args: str) -> str:
    done = subprocess.run(
        [sys.executable, *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def table_rows(out: str) -> list[list[str]]:
    lines = [line for line in out.splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]


def test_decode_bench_prints_a_row_per_thread_count_and_batch_size():
    out = run_script(
        "bench/decode_bench.py", "--rows", "1", "3", "--threads", "1", "--repeats", "1",
        "--max-new-tokens", "4",
    )  # fmt: skip
    rows = table_rows(out)
    assert [(r[0], r[1]) for r in rows] == [("1", "1"), ("1", "3")]
    assert all(float(r[2]) > 0 and float(r[3]) > 0 for r in rows)


def test_engine_bench_compares_batching_with_batch_size_one():
    out = run_script(
        "bench/engine_bench.py", "--concurrency", "2", "--requests-per-caller", "1",
        "--max-new-tokens", "4",
    )  # fmt: skip
    (row,) = table_rows(out)
    assert row[0] == "2" and float(row[1].replace(",", "")) > 0 and row[3].endswith("x")


def test_random_checkpoint_loads_with_plain_transformers(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "random-tiny"
    run_script("bench/random_checkpoint.py", "--preset", "tiny", "--out", str(out))
    model = AutoModelForCausalLM.from_pretrained(str(out))
    assert AutoTokenizer.from_pretrained(str(out)).eos_token_id == model.config.eos_token_id
    assert "never trained" in (out / "README.md").read_text(encoding="utf-8")
