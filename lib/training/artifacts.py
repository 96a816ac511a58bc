"""What one training run is made of (`TrainingArtifacts`), built once by
`lib.training.setup.build_training_artifacts` and shared by the loop, its callbacks and the export.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lib.data import DataSplits
from lib.presets import ModelPreset
from lib.training.callbacks import Callback, Reporter, RunState
from lib.training.config import TrainingConfig
from lib.training.distributed import DistContext
from lib.training.lora import LoraBase
from lib.training.state import DataCursor

DS_TAG = "deepspeed"  # DeepSpeed's sub-directory inside a state checkpoint


@dataclass
class TrainingArtifacts:
    """Everything one run needs, built once by `build_training_artifacts`."""

    config: TrainingConfig
    preset: ModelPreset
    tokenizer: object
    data: DataSplits
    model: torch.nn.Module  # what the loop calls (compiled, if asked)
    optimizer: torch.optim.Optimizer
    schedule: Callable[[int, float], float]  # (step, time fraction) -> learning rate
    cursor: DataCursor
    callbacks: list[Callback]
    reporter: Reporter
    device: torch.device
    ctx: DistContext
    vocab_size: int  # the model's (may exceed the tokenizer's)
    precision: str
    # training and validation documents, and those dropped for holding a held-out text
    doc_counts: tuple[int, int, int | None]
    t0: float
    deadline: float | None
    state: RunState = field(default_factory=RunState)
    history: list[dict] = field(default_factory=list)
    resumed_from: Path | None = None
    lora: LoraBase | None = None  # a LoRA run's base (--lora-rank): OUTPUT_DIR/final is an adapter

    def autocast(self):
        return autocast_for(self.precision, self.ctx.mode, self.device)


def autocast_for(precision: str, mode: str, device: torch.device):
    """The autocast context of a run's forward passes (none in fp32, nor under DeepSpeed, which
    casts the model itself)."""
    if precision == "fp32" or mode == "deepspeed":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)
