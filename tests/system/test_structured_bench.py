"""bench/structured_bench.py still runs (tiny settings; its numbers are not checked) and rewrites
its own section of a BENCHMARKS.md, leaving the rest."""

from __future__ import annotations

import subprocess
import sys

import pytest

from lib.presets import REPO_ROOT

pytestmark = pytest.mark.slow  # a subprocess that loads the model


def test_structured_bench_writes_its_section_and_leaves_the_rest(tmp_path):
    page = tmp_path / "BENCHMARKS.md"
    page.write_text("# Benchmarks\n\nbefore\n")
    args = ["--rows", "1", "--tokens", "4", "--requests-per-caller", "1", "--repeats", "1"]
    for _ in range(2):  # the second run replaces the first one's section
        done = subprocess.run(
            [sys.executable, "bench/structured_bench.py", *args, "--write", str(page)],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr[-3000:]
    text = page.read_text()
    assert text.startswith("# Benchmarks\n\nbefore\n")
    assert text.count("<!-- structured_bench:start -->") == 1
    rows = [line for line in text.splitlines() if line.startswith("| default")]
    kinds = {(cells[2].strip(), cells[3].strip()) for cells in (r.split("|") for r in rows)}
    assert {("1 rows", "regex"), ("1 rows", "json"), ("1 rows", "none")} <= kinds
    assert any("15 free + 1" in r and "| json |" in r for r in rows)
    assert any("| 16 json |" in r for r in rows)
