"""bench/restart_bench.py still runs (tiny settings: 2 clients, one kill under load; its numbers
are not checked here) and writes its section into a BENCHMARKS file, newest first."""

from __future__ import annotations

import subprocess
import sys

import pytest

from lib.presets import REPO_ROOT

pytestmark = pytest.mark.slow  # a real server, killed three times


def test_restart_bench_prints_a_row_per_kill_and_writes_its_section(tmp_path):
    doc = tmp_path / "BENCHMARKS.md"
    doc.write_text("# Benchmarks\n\n## History\n\n### 2026-01-01: Older\n\nold text\n")
    done = subprocess.run(
        [
            sys.executable, "bench/restart_bench.py", "--clients", "2", "--kills", "1",
            "--settle", "0", "--max-new-tokens", "4", "--write", str(doc),
        ],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("| ")][2:]
    assert [row.split("|")[2].strip() for row in rows] == [
        "idle",
        "2 clients",
        "2 clients, at once again",
    ]
    for row in rows:
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        assert float(cells[2]) > 0  # /ready 200 after the kill
        assert "ready s" in done.stdout and cells[-1].startswith("+")  # the restart's phases
    text = doc.read_text()
    assert text.index("Engine restart under load") < text.index("### 2026-01-01: Older")
    assert text.count("<!-- restart_bench:start -->") == 1 and "old text" in text
