"""Inference: batched generation and the `InferenceService` that the HTTP layer talks to."""

from lib.inference.generation import (
    GenerationFailed,
    GenerationParams,
    GenerationResult,
    PromptTooLong,
)
from lib.inference.service import InferenceService

__all__ = [
    "GenerationFailed",
    "GenerationParams",
    "GenerationResult",
    "InferenceService",
    "PromptTooLong",
]
