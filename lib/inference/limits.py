"""The serving engine's defaults (batching, math threads), in a module that imports no torch.

`GenerationEngine` (engine.py), its process (engine_process) and the service's
ML_SERVICE_MAX_BATCH_SIZE, BATCH_WAIT_MS and MAX_QUEUE settings start from these; the service's
settings import no torch, so the numbers live here and not in engine.py.
"""

import os

ENGINE_MAX_BATCH_SIZE = 64  # most sequences decoded together (1 disables batching)
ENGINE_MAX_WAIT_S = 0.0  # how long the first request to an idle engine waits for company
ENGINE_MAX_QUEUE = 256  # most requests waiting for a batch row; more are refused at once
# memory for the KV of cached prompt prefixes (prefix_cache.py): ~220 blocks of 16 tokens of a
# gpt2-124m-sized fp32 model, ~4,000 of the default model
PREFIX_CACHE_MB = 256
# memory for loaded LoRA adapters (adapters.py): a rank-16 adapter of every block product of a
# gpt2-124m-sized fp32 model takes ~9.4 MB, of the default model 0.5 MB
ADAPTER_MB = 256


def available_cores() -> int:
    """The CPU cores this process may run on (its affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


ALL_CORES_FROM_PARAMETERS = 10_000_000  # models this large compute with every core by default


def default_math_threads(parameters: int | None = None) -> int:
    """The model's math threads when none are set, by the model's size (`parameters`; unknown:
    treated as small). A model of ALL_CORES_FROM_PARAMETERS or more gets every core this
    process may use: its step is matrix work, and on 2 cores a gpt2-124m-sized model served
    40-70 % more tokens per second through HTTP with two threads than with one, streamed or not,
    fp32 or int8, with either engine. A smaller one gets every core but one, left to the HTTP
    side: the default 1.35 M-parameter model's step is so short that the HTTP side is its bound,
    and two threads served 20 % less there (BENCHMARKS.md, "Math threads"). The threshold lies
    between the two sizes measured. (The service's settings read ML_SERVICE_TORCH_THREADS /
    OMP_NUM_THREADS and pass them in.)"""
    cores = available_cores()
    if parameters is not None and parameters >= ALL_CORES_FROM_PARAMETERS:
        return cores
    return max(1, cores - 1)
