"""`lib.allocator.keep_freed_memory`: glibc keeps freed memory for the next training step.

Each check runs in a fresh interpreter, since malloc's settings last for the process."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from lib.presets import REPO_ROOT

# resident memory after a 256 MB tensor is written and freed, in MB, and what the call returned
PROBE = """
import sys
sys.path.insert(0, {root!r})
import torch
from lib.allocator import keep_freed_memory
kept = keep_freed_memory() if {call} else None

def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20

before = rss_mb()
x = torch.ones(64 * 2**20)  # 256 MB, written
del x
print(kept, round(rss_mb() - before))
"""


def probe(call: bool, **env) -> tuple[str, int]:
    out = subprocess.run(
        [sys.executable, "-c", PROBE.format(root=str(REPO_ROOT), call=call)],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, **env},
    ).stdout.split()
    return out[0], int(out[1])


@pytest.mark.slow  # two fresh interpreters
def test_freed_memory_stays_in_the_process_for_reuse():
    _, returned = probe(call=False)
    kept, held = probe(call=True)
    assert returned < 32  # glibc's default: a large block is unmapped when freed
    assert kept == "True" and held >= 250  # kept: the next step's tensors reuse those pages


@pytest.mark.slow  # two fresh interpreters
def test_it_stands_aside_when_switched_off_or_another_allocator_is_preloaded():
    assert probe(call=True, ML_KEEP_FREED_MEMORY="0")[0] == "False"
    assert probe(call=True, LD_PRELOAD="libtcmalloc_minimal.so.4")[0] == "False"
