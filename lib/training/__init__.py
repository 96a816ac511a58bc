"""Training: settings, set-up, the loop and its callbacks (validation, samples, saving), export.

The names below load on first use (`from lib.training import train`), so importing a light
submodule (`lib.training.schedulers`, `lib.training.config`) or this package does not import
torch or transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lib.training.evaluation import evaluate
    from lib.training.loop import TrainResult, train

__all__ = ["TrainResult", "evaluate", "train"]
_HOMES = {
    "TrainResult": "lib.training.loop",
    "evaluate": "lib.training.evaluation",
    "train": "lib.training.loop",
}


def __getattr__(name: str):
    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
