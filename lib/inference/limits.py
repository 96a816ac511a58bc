"""The serving engine's defaults (batching, math threads), in a module that imports no torch.

`GenerationEngine` (engine.py), its process (engine_process) and the service's
ML_SERVICE_MAX_BATCH_SIZE, BATCH_WAIT_MS and MAX_QUEUE settings start from these; the service's
settings import no torch, so the numbers live here and not in engine.py.
"""

import os

ENGINE_MAX_BATCH_SIZE = 64  # most sequences decoded together (1 disables batching)
ENGINE_MAX_WAIT_S = 0.0  # how long the first request to an idle engine waits for company
ENGINE_MAX_QUEUE = 256  # most requests waiting for a batch row; more are refused at once


def available_cores() -> int:
    """The CPU cores this process may run on (its affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def default_math_threads() -> int:
    """Every core but one, which is left to the callers' side (the HTTP event loop, streaming).
    On 2 cores that is one thread, and it measured faster than two at every load, batched or not
    (BENCHMARKS.md): with two, each parallel region waits for the core the event loop holds.
    (The service's settings read ML_SERVICE_TORCH_THREADS / OMP_NUM_THREADS and pass them in.)"""
    return max(1, available_cores() - 1)
