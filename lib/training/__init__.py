"""Training: optimizer, LR schedules and the training loop (one loop for every mode).

The names below load on first use (`from lib.training import train`), so importing a light
submodule (`lib.training.schedulers`) or this package does not import torch or transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lib.training.loop import TrainResult, evaluate, train

__all__ = ["TrainResult", "evaluate", "train"]


def __getattr__(name: str):
    if name in __all__:
        return getattr(importlib.import_module("lib.training.loop"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
