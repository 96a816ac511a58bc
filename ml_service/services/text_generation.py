"""The text-generation service: continue a text with a GPT-2-family checkpoint.

Its engine is the one `ML_SERVICE_ENGINE` names in `lib.inference.ENGINES`, built from the
settings' one `EngineSpec`. By default (`process`) that is `lib`'s continuous-batching engine in a
process of its own, and this process keeps only the tokenizer and the model's shape
(`FrontendInference`); with `thread`, or with an `InferenceService` handed in (the tests), it runs
in a thread of this process; `vllm` is vLLM's. Concurrent requests share decoding steps, each row
with its own parameters, and `/forward` can stream (`"stream": true`)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict

from lib.inference import (
    ENGINES,
    Engine,
    GenerationParams,
    GenerationResult,
    InferenceService,
    PreparedPrompt,
    PromptTooLong,
)
from lib.inference.adapters import AdapterNotFound
from lib.inference.constraints import InvalidConstraint, check_constraint
from lib.inference.frontend import FrontendInference
from lib.inference.prompts import check_may_fit
from ml_service.backend.schemas import (
    Completion,
    ForwardBatchRequest,
    ForwardBatchResponse,
    ForwardRequest,
    ForwardResponse,
    GenerationOptions,
    parameter_ranges,
)
from ml_service.contract import InvalidInput
from ml_service.services.common import CheckpointService, check_text_length


class TextGenerationService(CheckpointService):
    name = "text-generation"
    version = "0.1.0"
    description = "continue a text (Russian by default) with a GPT-2-family checkpoint"
    request_model = ForwardRequest
    response_model = ForwardResponse
    batch_request_model = ForwardBatchRequest
    batch_response_model = ForwardBatchResponse
    batch_field = "texts"

    def max_new_tokens(self) -> int:
        """The most new tokens a request may ask for: ML_SERVICE_MAX_NEW_TOKENS_LIMIT, and what a
        one-token prompt leaves of the context (`/metadata`'s `limits.max_new_tokens`)."""
        return min(self.settings.max_new_tokens_limit, self.inference.context_length - 1)

    def preprocess(self, request: ForwardRequest) -> PreparedPrompt:
        limit = self.max_new_tokens()
        if request.max_new_tokens > limit:
            raise InvalidInput(f"max_new_tokens must be <= {limit}", loc="max_new_tokens")
        check_text_length(request.text, self.settings.max_text_chars)
        params, context = request.to_generation_params(), self.context_length
        self.check_adapter(params.adapter)
        try:  # compiled here, in the preparing thread (cached: once per distinct constraint)
            check_constraint(self.tokenizer, params.constraint, self.vocab_size)
        except InvalidConstraint as e:
            raise InvalidInput(str(e), loc=["structured_outputs", e.field]) from None
        try:  # what cannot fit is refused from its length, before it is tokenized
            check_may_fit(self.tokenizer, [request.text], [params.max_new_tokens], context)
            return self.inference.prepare(request.text, params)
        except PromptTooLong as e:
            raise InvalidInput(str(e)) from None

    def batch_item_loc(self, i: int, loc: list) -> list:
        """A text's error is at texts[i]; the options are shared by the whole batch."""
        return ["texts", i] if loc == ["text"] else loc

    @classmethod
    def extra_routers(cls) -> list:
        from ml_service.backend.openai_routes import build_openai_router

        return [build_openai_router()]

    def __init__(self, settings, inference: InferenceService | None = None):
        super().__init__(settings, inference)
        self._model_given = inference is not None  # a loaded model handed in: the thread engine
        # the LoRA adapters its engine serves, name -> description (rank, sha256, ...), as the
        # model host last read them (ml_service/hosting.py: after each addition or removal)
        self.adapters: dict[str, dict] = {}

    def check_adapter(self, name: str | None) -> None:
        """AdapterNotFound (a 404) unless `name` is None (the base model) or served here."""
        if name is not None and name not in self.adapters:
            raise AdapterNotFound(name)

    def adapter_model_id(self, name: str | None) -> str:
        """What answers call the model that served: the model id, `<model id>:<adapter>` with an
        adapter (as the OpenAI routes list it)."""
        return self.model_id if name is None else f"{self.model_id}:{name}"

    @property
    def engine_kind(self) -> str:
        """The `lib.inference.ENGINES` name of what generates: ML_SERVICE_ENGINE, or `thread`
        whenever a model loaded elsewhere was handed in (the tests)."""
        return "thread" if self._model_given else self.settings.engine

    @property
    def engine_class(self) -> type[Engine]:
        return ENGINES[self.engine_kind]

    def load(self) -> None:
        if self.inference is None and self.engine_class.capabilities.loads_model:
            # the weights live in the engine (its process, or vLLM): here only the tokenizer
            self.inference = FrontendInference.load(self.settings.engine_spec())
        super().load()

    def warmup(self) -> None:
        if self.engine_class.capabilities.loads_model:
            return  # the engine warms up before it says it is ready
        self.inference.generate("Привет", GenerationParams(max_new_tokens=2, temperature=0))

    def create_engine(self, observer=None) -> Engine:
        """The engine ML_SERVICE_ENGINE names, from the settings' one spec: over the model loaded
        here, or loading its own (then this service's view of the model sends it its work)."""
        engine_class = self.engine_class
        model = None if engine_class.capabilities.loads_model else self.inference
        engine = engine_class.create(self.settings.engine_spec(), model=model, observer=observer)
        if isinstance(self.inference, FrontendInference):
            self.inference.engine = engine
        return engine

    def predict(self, batch: list[PreparedPrompt]) -> list[GenerationResult]:
        """The contract's batch call (the engine above serves HTTP requests instead)."""
        return self.inference.generate_prepared(batch)

    def postprocess(self, output: GenerationResult, request: ForwardRequest) -> ForwardResponse:
        model = self.adapter_model_id(request.adapter)
        return ForwardResponse(model=model, **Completion.from_result(output).model_dump())

    def cache_key(self, item: PreparedPrompt) -> str | None:
        """Greedy or seeded generations only (an unseeded sample must differ each time): the
        checkpoint's content hash, the numerics that run it (backend, precision and device kind:
        bfloat16, int8, ONNX Runtime or a GPU round differently, so their greedy answers may
        differ), the engine (vLLM's kernels and sampler differ from ours), the adapter's content
        hash (an adapter added again from other weights under the same name never hits the old
        entries), the prompt's ids and every parameter after defaults (the adapter's name too)."""
        p = item.params
        if p.temperature != 0 and p.seed is None:
            return None
        inference = self.inference
        if inference.checkpoint_sha256 is None:  # e.g. a random preset: no content to name
            return None
        runtime = inference.runtime()  # torch or ONNX Runtime, and the precision it runs in
        numerics = f"{runtime['backend']}:{runtime['precision']}@{inference.device.type}"
        # engines of one family (ours, in a process or a thread: the same code) decode alike;
        # another family (vLLM) samples differently
        engine = self.engine_class.family
        adapter = None
        if p.adapter is not None:
            if p.adapter not in self.adapters:  # removed meanwhile: the engine will refuse it
                return None
            adapter = self.adapters[p.adapter]["sha256"]
        identity = [
            inference.checkpoint_sha256,
            numerics,
            engine,
            adapter,
            list(item.ids),
            asdict(p),
        ]
        return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()

    def cache_encode(self, output: GenerationResult) -> dict:
        return output.to_dict()

    def cache_decode(self, data: dict) -> GenerationResult:
        return GenerationResult.from_dict(data)

    def cache_complete(self, output: GenerationResult) -> bool:
        return output.finish_reason != "cancelled"

    def split_batch(self, batch_request: ForwardBatchRequest) -> list[ForwardRequest]:
        """One request per text; with a seed, row i samples with seed + i (rows differ, the batch
        stays reproducible)."""
        self.check_batch_size(len(batch_request.texts))
        options = batch_request.model_dump(exclude={"texts"})  # stream stays False: JSON only
        out = []
        for i, text in enumerate(batch_request.texts):
            seed = None if options["seed"] is None else (options["seed"] + i) % 2**63
            out.append(ForwardRequest.model_construct(**{**options, "seed": seed, "text": text}))
        return out

    def batch_response(self, responses: list[ForwardResponse]) -> ForwardBatchResponse:
        # (one adapter for the whole batch: its texts share the options)
        model = responses[0].model if responses else self.model_id
        return ForwardBatchResponse(
            model=model,
            results=[Completion(**r.model_dump(exclude={"model"})) for r in responses],
        )

    def metadata(self) -> dict:
        """Adds `engine` (what generates: `process`, `thread` or `vllm`), `adapters` (the LoRA
        adapters served: name, model id, rank, content hash) and `sampling`: each generation
        parameter's default and range."""
        adapters = [
            {
                "name": name,
                "model": self.adapter_model_id(name),
                "rank": a["rank"],
                "sha256": a["sha256"],
            }
            for name, a in sorted(self.adapters.items())
        ]
        return {
            **super().metadata(),
            "engine": self.engine_kind,
            "adapters": adapters,
            "sampling": parameter_ranges(GenerationOptions),
        }

    def limits(self) -> dict:
        return {**super().limits(), "max_new_tokens": self.max_new_tokens()}

    # -- what the OpenAI routes read of the loaded model (ml_service/backend/openai_*.py): this
    # public surface, so that the HTTP layer never reaches into `self.inference` (vLLM's serving
    # classes ask their engine client for the tokenizer the same way)
    @property
    def tokenizer(self):
        """The checkpoint's tokenizer: its chat template, text to ids and back, token text."""
        return self.inference.tokenizer

    @property
    def context_length(self) -> int:
        return self.inference.context_length

    @property
    def vocab_size(self) -> int:
        return self.inference.vocab_size

    def prepare_ids(self, ids: list[int], params: GenerationParams) -> PreparedPrompt:
        """A prompt given as token ids, checked (PromptTooLong, InvalidTokens) and ready to
        queue."""
        return self.inference.prepare_ids(ids, params)

    def prompt_logprobs(self, ids: list[int], top: int = 0) -> list:
        """The prompt's own log-probabilities (None for its first token), each with its `top`
        alternatives; blocking (run it in a thread)."""
        return self.inference.prompt_logprobs(ids, top)
