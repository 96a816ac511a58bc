"""Inference: batched generation and the `InferenceService` that the HTTP layer talks to."""

from lib.inference.engine import (
    EngineObserver,
    EngineStopped,
    GenerationEngine,
    PreparedPrompt,
    QueueFull,
)
from lib.inference.generation import (
    MAX_LOGPROBS,
    GenerationFailed,
    GenerationParams,
    GenerationResult,
    InvalidTokens,
    PromptTooLong,
    TokenLogprob,
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
    "InvalidTokens",
    "MAX_LOGPROBS",
    "PromptTooLong",
    "TokenLogprob",
]
