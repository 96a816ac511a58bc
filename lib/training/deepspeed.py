"""DeepSpeed ZeRO: the engine configuration, generated from the run's settings (never hand-edited JSON),
and the engine's start.

The loop keeps its own loss normalisation (per-step target count), LR schedule and data cursor;
DeepSpeed partitions optimizer state (ZeRO-1), gradients (ZeRO-2) and parameters (ZeRO-3).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager

from lib.training.config import TrainingConfig

SHM_OP = "deepspeed_shm_comm"
# Longer than any one DeepSpeed op build takes (the CPU shared-memory op builds in under a minute; a
# CUDA op in a few): a torch-extension build lock older than this is left by a killed build.
BUILD_LOCK_DEADLINE_S = 600.0


class StaleBuildLock(RuntimeError):
    """A torch-extension build lock that no build will release (its build was killed)."""


def deepspeed_config(config: TrainingConfig) -> dict:
    """The DeepSpeed config dict for a run (`--mode deepspeed --zero-stage N`)."""
    return {
        "train_micro_batch_size_per_gpu": config.batch_size,
        "gradient_accumulation_steps": config.grad_accum,
        "gradient_clipping": config.grad_clip,
        "zero_optimization": {
            "stage": config.zero_stage,
            "overlap_comm": True,
            "contiguous_gradients": True,
            # ZeRO-3 export gathers full weights on rank 0 (16-bit when training in 16 bits, else fp32)
            "stage3_gather_16bit_weights_on_model_save": config.zero_stage == 3,
        },
        "bf16": {"enabled": config.precision == "bf16"},
        "fp16": {"enabled": config.precision == "fp16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


@contextmanager
def bounded_build_waits(deadline_s: float = BUILD_LOCK_DEADLINE_S) -> Iterator[None]:
    """While active, a wait on a torch-extension build lock (torch's `FileBaton.wait`, which
    otherwise polls forever) fails with `StaleBuildLock`, naming the file, once the lock is older
    than `deadline_s`: at once for a lock a killed build left long ago, else at the deadline."""
    from torch.utils.file_baton import FileBaton

    def wait(baton: FileBaton) -> None:
        path = baton.lock_file_path
        while True:
            try:
                age = time.time() - os.path.getmtime(path)
            except FileNotFoundError:
                return  # released: the build finished
            if age > deadline_s:
                raise StaleBuildLock(
                    f"the torch-extension build lock {path} is {age:.0f} s old: a build that "
                    "was killed left it, and every later build would wait on it forever. "
                    f"If no build is running, remove it (rm {path}) and start again."
                )
            time.sleep(baton.wait_seconds)

    original = FileBaton.wait
    FileBaton.wait = wait
    try:
        yield
    finally:
        FileBaton.wait = original


def initialize(model, optimizer, config: TrainingConfig):
    """`deepspeed.initialize` for a run: (engine, optimizer).

    DeepSpeed's communication backend (`deepspeed/comm/torch.py`, `TorchBackend.__init__` ->
    `build_shm_op`) JIT-builds its CPU shared-memory op at every start on the CPU accelerator; a
    run killed during that build leaves a lock on which every later start waits forever. The op
    serves only DeepSpeed's tensor-parallel inference all-reduce, never training (gloo does the
    collectives), so it is kept out through the compatibility table that `build_shm_op` consults.
    Any other build lock is waited on with a deadline (`bounded_build_waits`).
    """
    import deepspeed

    deepspeed.ops.__compatible_ops__[SHM_OP] = False
    with bounded_build_waits():
        engine, optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=deepspeed_config(config)
        )
    return engine, optimizer
