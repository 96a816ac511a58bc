"""What the built-in services share: a checkpoint loaded through `lib`, and text limits."""

from __future__ import annotations

from lib.inference import InferenceService
from lib.inference.engine_process.worker import load_engine_service
from ml_service.contract import InvalidInput, ModelService


def load_inference(settings) -> InferenceService:
    """The checkpoint the settings name, or (only when asked) a randomly initialised preset,
    loaded here as the engine process loads it (with one CPU thread in the calling thread: the
    engine's thread does the serving math, and a second OpenMP pool left by this thread would
    slow every decode step down; see `lib/inference/engine.py`)."""
    return load_engine_service(settings.engine_spec())


def check_text_length(text: str, limit: int, loc: str = "text") -> None:
    if len(text) > limit:
        raise InvalidInput(f"text has {len(text)} characters; the limit is {limit}", loc=loc)


class CheckpointService(ModelService):
    """A service over one GPT checkpoint: `load()` goes through `InferenceService` (or takes one
    already loaded, as the tests do), and /metadata describes the model and the limits."""

    def __init__(self, settings, inference: InferenceService | None = None):
        super().__init__(settings)
        self.inference = inference

    def load(self) -> None:
        if self.inference is None:
            self.inference = load_inference(self.settings)

    @property
    def model_id(self) -> str:
        return self.inference.model_id

    def limits(self) -> dict:
        s = self.settings
        return {
            "max_texts": self.batch_limit(),
            "max_batch_size": s.max_batch_size,
            "max_queue": s.max_queue,
            "max_text_chars": s.max_text_chars,
            "max_file_bytes": s.max_file_bytes,
            "context_length": self.inference.context_length,
        }

    def metadata(self) -> dict:
        return {**super().metadata(), **self.inference.metadata(), "limits": self.limits()}
