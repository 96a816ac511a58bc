"""Inference: batched generation and the `InferenceService` that the HTTP layer talks to."""

from lib.inference.engine import (
    EngineObserver,
    EngineStopped,
    GenerationEngine,
    PreparedPrompt,
    QueueFull,
)
from lib.inference.generation import (
    GenerationFailed,
    GenerationParams,
    GenerationResult,
    PromptTooLong,
)
from lib.inference.service import InferenceService

__all__ = [
    "EngineObserver",
    "EngineStopped",
    "GenerationEngine",
    "PreparedPrompt",
    "QueueFull",
    "GenerationFailed",
    "GenerationParams",
    "GenerationResult",
    "InferenceService",
    "PromptTooLong",
]
