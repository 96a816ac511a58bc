"""Inference: the engine contract and its registry, the public request/result types, and the
`InferenceService` that loads a model for serving.

The contract (`Engine`, its errors), the registry (`ENGINES`, `EngineSpec`) and the types import
no torch, so the server's settings and schemas stay light; the classes that run models
(`InferenceService`, `GenerationEngine`) are imported from here on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from lib.inference.contract import (
    Engine,
    EngineCapabilities,
    EngineDied,
    EngineObserver,
    EngineRestarting,
    EngineStartFailed,
    EngineStopped,
    QueueFull,
    TokenStream,
    Unsupported,
)
from lib.inference.registry import ENGINES, EngineSpec, LoadSpec
from lib.inference.types import (
    MAX_LOGPROBS,
    GenerationFailed,
    GenerationParams,
    GenerationResult,
    InvalidTokens,
    PreparedPrompt,
    PromptTooLong,
    TokenLogprob,
)

if TYPE_CHECKING:
    from lib.inference.engine import GenerationEngine
    from lib.inference.service import InferenceService

_HEAVY = {  # name -> module: these import torch, so only when asked for
    "GenerationEngine": "lib.inference.engine",
    "InferenceService": "lib.inference.service",
}


def __getattr__(name: str):
    if name in _HEAVY:
        return getattr(importlib.import_module(_HEAVY[name]), name)
    raise AttributeError(f"module 'lib.inference' has no attribute {name!r}")


__all__ = [
    "ENGINES",
    "MAX_LOGPROBS",
    "Engine",
    "EngineCapabilities",
    "EngineDied",
    "EngineObserver",
    "EngineRestarting",
    "EngineSpec",
    "EngineStartFailed",
    "EngineStopped",
    "GenerationEngine",
    "GenerationFailed",
    "GenerationParams",
    "GenerationResult",
    "InferenceService",
    "InvalidTokens",
    "LoadSpec",
    "PreparedPrompt",
    "PromptTooLong",
    "QueueFull",
    "TokenLogprob",
    "TokenStream",
    "Unsupported",
]
