"""What the built-in services share: loading the checkpoint through `lib`, and text limits."""

from __future__ import annotations

import torch

from lib.inference import InferenceService
from ml_service.contract import InvalidInput


def load_inference(settings) -> InferenceService:
    """The checkpoint the settings name, or (only when asked) a randomly initialised preset."""
    if settings.random_preset:
        return InferenceService.random_baseline(settings.random_preset)
    return InferenceService.from_checkpoint(
        settings.checkpoint, device=settings.device, dtype=getattr(torch, settings.dtype)
    )


def check_text_length(text: str, limit: int, loc: str = "text") -> None:
    if len(text) > limit:
        raise InvalidInput(f"text has {len(text)} characters; the limit is {limit}", loc=loc)
