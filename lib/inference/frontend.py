"""The server process's view of a model whose engine holds the weights (its own process, vLLM).

`FrontendInference` is an `InferenceService` loaded from the engine's own spec without weights
(`InferenceService.from_spec(..., weights=False)`: the tokenizer, the checkpoint's identity and the
model's shape on torch's meta device), so `prepare`, the limits and /metadata work here, while what
needs the weights (`prompt_logprobs`, `generate_prepared`) goes to the engine once `engine` is set.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from lib.inference.contract import Engine, EngineStopped
from lib.inference.registry import EngineSpec
from lib.inference.service import InferenceService
from lib.inference.types import GenerationParams, GenerationResult, PreparedPrompt


class FrontendInference(InferenceService):
    def __init__(self, *args, spec: EngineSpec, **kwargs):
        super().__init__(*args, **kwargs)
        self.spec = spec
        self.engine: Engine | None = None  # the engine that holds the weights, once started

    @classmethod
    def load(cls, spec: EngineSpec) -> FrontendInference:
        return cls.from_spec(spec.load, weights=False, spec=spec)

    def _engine(self) -> Engine:
        if self.engine is None:
            raise EngineStopped("the engine has not been started")
        return self.engine

    def prompt_logprobs(self, ids: Sequence[int], top: int = 0):
        return self._engine().prompt_logprobs(ids, top)

    def generate_prepared(self, items: Sequence[PreparedPrompt]) -> list[GenerationResult]:
        """Run by the engine (blocking: call it from a thread without an event loop)."""
        return asyncio.run(self._engine().submit_many(items))

    def generate_batch(self, prompts, params=None, should_stop=None) -> list[GenerationResult]:
        if params is None or isinstance(params, GenerationParams):
            params = [params or GenerationParams()] * len(prompts)
        return self.generate_prepared(
            [self.prepare(t, p) for t, p in zip(prompts, params, strict=True)]
        )

    def score(self, texts):
        raise NotImplementedError("scoring runs in-process (the score service), not here")
