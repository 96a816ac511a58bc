"""Keep freed memory in the process for the next step (glibc's malloc), for training on CPUs.

glibc gives every allocation above its mmap threshold (at most 32 MB) pages of its own and returns
them to the kernel when freed; a training step allocates and frees the same activations, logits and
gradients every time, so each step pays the page faults again. On a 2-core AMD EPYC that was a
quarter of the `make train-baseline` model's step (BENCHMARKS.md, "The allocator"). With no mmap
per allocation and no trimming, freed blocks stay in the heap and the next step reuses them: the
process keeps its peak memory instead of returning it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
_M_MMAP_MAX = -4


def keep_freed_memory() -> bool:
    """Tell glibc's malloc to keep freed memory for reuse. True when it did; False where the C
    library is not glibc, another allocator (tcmalloc, jemalloc) is preloaded, or
    `ML_KEEP_FREED_MEMORY=0` turns it off."""
    if os.environ.get("ML_KEEP_FREED_MEMORY", "1") == "0":
        return False
    preload = os.environ.get("LD_PRELOAD", "")
    if "tcmalloc" in preload or "jemalloc" in preload:
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mallopt returns 1 on success
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
