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
    """The model's math threads when none are set: every core this process may use. On 2 cores,
    two threads served 40-70 % more tokens per second than one through HTTP, streamed or not,
    with the engine in its own process and in the server's (BENCHMARKS.md, "Math threads"; the
    issue that asked for it measured +50-66 % on an AVX2 machine too). The default used to leave
    one core to the event loop, from an older measurement on one VM where one thread had been as
    fast. (The service's settings read ML_SERVICE_TORCH_THREADS / OMP_NUM_THREADS and pass them
    in.)"""
    return available_cores()
