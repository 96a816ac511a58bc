"""Process groups and model wrapping for multi-process training (torchrun): DDP and FSDP.

`--mode baseline` under torchrun wraps the model in DistributedDataParallel; `--mode fsdp` shards
every transformer block and the root with FSDP2 (`fully_shard`). NCCL on GPUs, gloo on CPUs.
Export and training-state saves gather full (unsharded) state dicts on rank 0.

This is the one training module that reads the environment: torchrun's WORLD_SIZE, RANK and
LOCAL_RANK, and, for a single process that still needs a process group (FSDP, DeepSpeed), it sets
defaults for MASTER_ADDR, MASTER_PORT, RANK and WORLD_SIZE.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

from lib.training.config import launched_world_size
from lib.training.settings import MODES as MODES  # the choices live with the settings


@dataclass
class DistContext:
    mode: str = "baseline"
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return dist.is_available() and dist.is_initialized()

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def mean(self, value: float) -> float:
        if not self.active:
            return value
        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t)
        return t.item() / self.world_size

    def any(self, flag: bool) -> bool:
        if not self.active:
            return flag
        t = torch.tensor([int(flag)])
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())


def launched_processes() -> int:
    """Processes torchrun launched, from this process's environment (1 without torchrun)."""
    return launched_world_size(os.environ)


def init_distributed(mode: str, device_type: str) -> DistContext:
    """Join the process group torchrun describes (FSDP also needs one for a single process)."""
    world = launched_processes()
    if (world > 1 or mode in ("fsdp", "deepspeed")) and not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29517")
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    ctx = DistContext(
        mode, int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0"))
    )
    if device_type == "cuda":
        torch.cuda.set_device(ctx.local_rank)
    return ctx


def wrap_model(model: torch.nn.Module, ctx: DistContext) -> torch.nn.Module:
    """FSDP2 or DDP; DeepSpeed wraps the model itself (deepspeed.initialize)."""
    if ctx.mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in model.transformer.h:
            fully_shard(block)
        fully_shard(model)  # the root holds the tied embedding / LM head
        return model
    if ctx.mode == "baseline" and ctx.world_size > 1:
        return torch.nn.parallel.DistributedDataParallel(model)
    return model


_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_model_state(model: torch.nn.Module, ctx: DistContext) -> dict:
    """The unsharded model state (complete on rank 0; a collective under FSDP)."""
    if ctx.mode == "fsdp":
        return get_model_state_dict(model, options=_FULL)
    if ctx.mode == "deepspeed":
        if model.zero_optimization_stage() == 3:
            return (
                model._zero3_consolidated_16bit_state_dict() or {}
            )  # gathers partitions on rank 0
        return {k: v.detach().cpu() for k, v in model.module.state_dict().items()}
    module = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
    return {k: v.detach().cpu() for k, v in module.state_dict().items()}


def full_optimizer_state(model: torch.nn.Module, optimizer, ctx: DistContext) -> dict:
    if ctx.mode == "fsdp":
        return get_optimizer_state_dict(model, optimizer, options=_FULL)
    if ctx.mode == "deepspeed":
        return {}  # partitioned: DeepSpeed's own save_checkpoint writes it (see save_state)
    return optimizer.state_dict()


def load_optimizer_state(model: torch.nn.Module, optimizer, state: dict, ctx: DistContext) -> None:
    """Every rank passes the full state it read from the checkpoint."""
    if ctx.mode == "fsdp":
        set_optimizer_state_dict(
            model, optimizer, state, options=StateDictOptions(full_state_dict=True)
        )
    else:
        optimizer.load_state_dict(state)


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
