"""OpenAI requests into engine calls, and engine results into OpenAI responses (vLLM's
`serving_engine.py` / `serving_models.py`; completions and chat are `openai_completions.py` and
`openai_chat.py`). The engine, limits, keys, metrics and logs are the ones `/forward` uses, through
the same execution (`execution.py`); only the shapes differ.

- A serving object is made per request and holds what it runs on: the loaded version the request
  names (`model`), its service (the public surface of `TextGenerationService`) and its engine.
- `n` choices per prompt are separate rows of the same batch; with a `seed`, the choice at index
  `i` (prompt p, choice c: i = p * n + c, OpenAI's order) samples with `seed + i`.
- `logprobs` are the model's raw log-probabilities (before penalties and temperature), as vLLM's
  default; they are not streamed (a streamed request that asks for them is a 400).
- A LoRA adapter is its own model id, `<model>:<adapter>` (`<model>` any id of the version that
  serves it; also the adapter's bare name), listed by /v1/models with `parent` the base's id, as
  vLLM lists its LoRA modules; one that is not loaded is a 404 `model_not_found`.
- A structured-output constraint (`response_format`, `structured_outputs`) is compiled in the
  preparing thread with the prompts (`check_constraint`): a bad one is a 400 naming its field
  before anything reaches the engine.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, replace

from fastapi import Request
from fastapi.responses import StreamingResponse

from lib.inference import GenerationParams, GenerationResult, InvalidTokens, PromptTooLong
from lib.inference.constraints import InvalidConstraint, check_constraint
from lib.inference.prompts import check_may_fit
from lib.tokenizer import token_bytes
from ml_service.backend.errors import AdapterNotLoaded, BadRequest, ModelNotFound, ServiceError
from ml_service.backend.execution import (
    StreamFormat,
    check_room,
    run_items,
    sse,
    stream_items,
    stream_response,
)
from ml_service.backend.openai_protocol import (
    ModelCard,
    ModelList,
    PromptTokensDetails,
    SamplingRequest,
    UsageInfo,
)
from ml_service.hosting import Loaded

OWNER = "ml_service"
FINISH = {"eos": "stop", "stop": "stop", "length": "length", "cancelled": "stop"}
# chat messages of a checkpoint without a chat template of its own are rendered as a plain
# "Пользователь: / Ассистент:" transcript (the default model never saw dialogues), and then the
# fallback's stop string keeps the model from writing the user's next turn
FALLBACK_STOP = "\nПользователь:"
FALLBACK_TEMPLATE = (
    "{%- for m in messages -%}"
    "{%- if m.role in ['system', 'developer'] -%}{{ m.content }}\n\n"
    "{%- elif m.role == 'user' -%}Пользователь: {{ m.content }}\n"
    "{%- else -%}Ассистент: {{ m.content }}\n"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}Ассистент:{%- endif -%}"
)


# -- models --------------------------------------------------------------------------------------
def _version(loaded: Loaded) -> str | None:
    """The serving version, when versions are served (ML_SERVICE_MODELS_DIR)."""
    return loaded.version if loaded.service.settings.models_dir is not None else None


def model_ids(loaded: Loaded) -> list[str]:
    """The ids a request may name: the served model name (ML_SERVICE_SERVED_MODEL_NAME) when
    set, the model's, and the version serving it when there is one."""
    ids = [loaded.service.settings.served_model_name, loaded.service.model_id, _version(loaded)]
    return list(dict.fromkeys(i for i in ids if i))


def served_name(loaded: Loaded) -> str:
    """What responses call the model: the served model name when set, else the version that
    served it (or the model id)."""
    settings = loaded.service.settings
    return settings.served_model_name or _version(loaded) or loaded.service.model_id


def chat_template(loaded: Loaded) -> str:
    """The checkpoint's chat template, or the fallback transcript."""
    return loaded.service.tokenizer.chat_template or FALLBACK_TEMPLATE


def all_loaded(deps) -> list[Loaded]:
    """The versions a request may name: the one chosen for it first, then the others loaded."""
    others = [v for name, v in sorted(deps.host.loaded.items()) if v is not deps.model]
    return [deps.model, *others]


def adapters_of(loaded: Loaded) -> dict[str, dict]:
    """The LoRA adapters `loaded`'s engine serves (name -> description; none for a service or an
    engine without them)."""
    return getattr(loaded.service, "adapters", {})


def requested_model(deps, requested: str | None) -> tuple[Loaded, str | None]:
    """The version a request's `model` names, and the adapter: the model id (or omitted) leaves
    the choice to the traffic split (`deps.model`); a loaded version's name pins that version;
    `<either>:<adapter>` (or an adapter's bare name) adds the adapter, which must be loaded
    there."""
    if requested is None or requested in model_ids(deps.model):
        return deps.model, None
    if requested in deps.host.loaded and deps.settings.models_dir is not None:
        return deps.pin(requested), None
    base, colon, adapter = requested.rpartition(":")
    if (
        colon
        and base
        and (
            base in model_ids(deps.model)
            or (base in deps.host.loaded and deps.settings.models_dir is not None)
        )
    ):
        loaded, _ = requested_model(deps, base)
    elif requested in adapters_of(deps.model):  # a bare adapter name, as vLLM lists them
        loaded, adapter = deps.model, requested
    else:
        raise _not_served(deps, requested)
    if adapter not in adapters_of(loaded):
        held = ", ".join(sorted(adapters_of(loaded))) or "none"
        raise AdapterNotLoaded(
            [{"loc": ["model"], "msg": f"{requested!r}: adapter {adapter!r} is not loaded here "
              f"(loaded: {held})"}]
        )  # fmt: skip
    return loaded, adapter


def _not_served(deps, requested: str) -> ModelNotFound:
    served = ", ".join(card.id for card in list_models(deps).data)
    return ModelNotFound(
        [{"loc": ["model"], "msg": f"{requested!r} is not served here ({served})"}]
    )


def list_models(deps) -> ModelList:
    """Every id a request may name, once (the version chosen for this request first), each with
    its context length and chat template; then each version's adapters, as `<model>:<adapter>`
    with `parent` the id they are listed under. `root`: the model id the weights are."""
    cards = []
    for loaded in all_loaded(deps):
        card = {
            "created": int(loaded.created),
            "owned_by": OWNER,
            "context_length": loaded.service.context_length,
            "version": _version(loaded),
            "chat_template": chat_template(loaded),
            "root": loaded.service.model_id,
        }
        cards += [ModelCard(id=name, **card) for name in model_ids(loaded)]
        base = served_name(loaded)
        cards += [
            ModelCard(id=f"{base}:{name}", parent=base, **card)
            for name in sorted(adapters_of(loaded))
        ]
    return ModelList(data=list({card.id: card for card in cards}.values()))


def retrieve_model(deps, model_id: str) -> ModelCard:
    """The card `/v1/models` lists for `model_id`; 404 `model_not_found` for an id not served."""
    for card in list_models(deps).data:
        if card.id == model_id:
            return card
    raise _not_served(deps, model_id)


# -- the shapes both endpoints share -------------------------------------------------------------
@dataclass
class Prompt:
    ids: list[int]  # without the leading end-of-document token
    text: str


def refuse(param: str, msg: str) -> BadRequest:
    """A 400 whose OpenAI `param` is `param` (dotted: `messages.0.content`)."""
    return BadRequest([{"loc": param.split("."), "msg": msg}])


def usage(prompts: Sequence[Prompt], outputs: Sequence[GenerationResult]) -> UsageInfo:
    prompt_tokens = sum(len(p.ids) for p in prompts)  # once per prompt, whatever n is
    completion = sum(o.completion_tokens for o in outputs)
    # cached: per prompt, the most any of its n choices found in the prefix cache (outputs are
    # in prompt order, n each)
    n = max(1, len(outputs) // max(1, len(prompts)))
    cached = sum(
        max((o.cached_tokens for o in outputs[i * n : (i + 1) * n]), default=0)
        for i in range(len(prompts))
    )
    return UsageInfo(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion,
        total_tokens=prompt_tokens + completion,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=min(cached, prompt_tokens)),
    )


def token_text(tokenizer, token_id: int) -> str:
    return token_bytes(tokenizer, token_id).decode("utf-8", errors="replace")


class OpenAIServing:
    """What completions and chat share: one request against the loaded version its `model` names
    (404 unless that is served here), with that version's service and engine."""

    def __init__(self, request: Request, deps, requested: str | None):
        self.request, self.deps = request, deps
        self.loaded, self.adapter = requested_model(deps, requested)
        self.service = self.loaded.service  # a TextGenerationService (the OpenAI routes' only)
        if self.adapter is not None:
            request.state.adapter = self.adapter  # the access log, the metrics

    def header(self, prefix: str) -> dict:
        """The fields every response (and every chunk of one stream) starts with: a new id with
        `prefix`, the time, the served model (`<model>:<adapter>` with an adapter) and its
        fingerprint."""
        name = served_name(self.loaded)
        if self.adapter is not None:
            name = f"{name}:{self.adapter}"
        return {
            "id": f"{prefix}-{uuid.uuid4().hex}",
            "created": int(time.time()),
            "model": name,
            "system_fingerprint": name,
        }

    def check_constraint(self, req: SamplingRequest) -> None:
        """The request's constraint compiled against the tokenizer (blocking: the preparing
        thread), or a 400 naming its field and the reason. Compiled once per distinct
        constraint: the engine's rows reuse it."""
        constraint, param = req.constraint()
        try:
            check_constraint(self.service.tokenizer, constraint, self.service.vocab_size)
        except InvalidConstraint as e:
            raise refuse(param, str(e)) from None

    def check_text(self, param: str, what: str, text: str) -> None:
        if len(text) > (limit := self.service.settings.max_text_chars):
            raise refuse(param, f"{what} has {len(text)} characters; the limit is {limit}")

    def check_may_fit(self, param: str, texts: Sequence[str], asked: int | None) -> None:
        """Refuse, from their lengths alone and before they are tokenized, texts that cannot fit
        the context with the tokens asked (at least one: a prompt scored alone, `max_tokens: 0`
        with `echo`, fits when it leaves room for one)."""
        new = 1 if asked is None else max(1, self._tokens_asked(asked, 0))
        tok, context = self.service.tokenizer, self.service.context_length
        try:
            check_may_fit(tok, texts, [new] * len(texts), context)
        except PromptTooLong as e:
            raise refuse(param, f"prompt {e.index}: {e}" if len(texts) > 1 else str(e)) from None

    def _tokens_asked(self, asked: int | None, prompt_len: int) -> int:
        """max_tokens as asked (checked against the limit), or what fits when it is not given."""
        limit = self.service.max_new_tokens()  # /metadata's limits.max_new_tokens
        if asked is None:  # chat without a limit: the service's default, within the context
            room = self.service.context_length - prompt_len
            return max(1, min(GenerationParams().max_new_tokens, limit, room))
        if asked > limit:
            raise refuse("max_tokens", f"must be <= {limit}")
        return asked

    def engine_items(
        self,
        req: SamplingRequest,
        prompts: Sequence[Prompt],
        asked: int | None,
        logprobs: int | None,
        param: str,
        extra_stop: tuple[str, ...] = (),
    ) -> list:
        """One engine item per choice (prompt-major), each checked to fit the context."""
        total = len(prompts) * req.n
        if total > (limit := self.service.batch_limit()):
            raise refuse("n", f"{total} choices in one request; the limit is {limit}")
        items = []
        for p, prompt in enumerate(prompts):
            new = self._tokens_asked(asked, len(prompt.ids))
            for c in range(req.n):
                params = req.params(new, logprobs, req.choice_seed(p * req.n + c))
                params = replace(params, adapter=self.adapter)
                if extra_stop and len(params.stop) < 8:
                    stop = params.stop + tuple(s for s in extra_stop if s not in params.stop)
                    params = replace(params, stop=stop)
                try:
                    items.append(self.service.prepare_ids(prompt.ids, params))
                except (PromptTooLong, InvalidTokens) as e:
                    raise refuse(param, str(e)) from None
        return items

    async def generate(self, items: list, opted_in: bool) -> list[GenerationResult]:
        check_room(self.loaded.engine, len(items))
        return await run_items(self.request, self.deps, self.loaded, items, opted_in)

    async def stream(self, items: list, opted_in: bool, chunks: StreamFormat) -> StreamingResponse:
        check_room(self.loaded.engine, len(items))
        # queued now (a full queue is a 503), or cached answers as streams
        streams = await stream_items(self.request, self.deps, self.loaded, items, opted_in)
        return stream_response(self.request, self.deps, streams, chunks)


class OpenAIChunks(StreamFormat):
    """A streamed completion or chat: one `data:` chunk per piece, all with one id and header;
    each choice's newest piece is held back so that its last one carries the finish reason; then
    the usage chunk (when `stream_options.include_usage` asks for it) and `[DONE]`. A failure ends
    the stream with OpenAI's error body, then `[DONE]`."""

    def __init__(self, header: dict, obj: str, prompts: Sequence[Prompt], req: SamplingRequest):
        self.base = {**header, "object": obj}
        self.prompts = prompts
        self.include_usage = req.stream_options is not None and req.stream_options.include_usage
        self.started: set[int] = set()
        self.held: dict[int, str] = {}

    def choice(self, i: int, text: str, finish: str | None, first: bool) -> dict:
        """Choice `i` of one chunk (`first`: the choice's first piece)."""
        raise NotImplementedError

    def _chunk(self, i: int, text: str, result: GenerationResult | None) -> str:
        first = i not in self.started
        self.started.add(i)
        finish = None if result is None else FINISH[result.finish_reason]
        return sse({**self.base, "choices": [self.choice(i, text, finish, first)]})

    def piece(self, i: int, text: str) -> list[str]:
        out = [self._chunk(i, self.held[i], None)] if i in self.held else []
        self.held[i] = text
        return out

    def result(self, i: int, result: GenerationResult) -> list[str]:
        return [self._chunk(i, self.held.pop(i, ""), result)]

    def finished(self, results: list[GenerationResult]) -> list[str]:
        out = []
        if self.include_usage:
            counts = usage(self.prompts, results).model_dump()
            out.append(sse({**self.base, "choices": [], "usage": counts}))
        return [*out, sse("[DONE]")]

    def failed(self, error: ServiceError) -> list[str]:
        return [sse(error.openai_body()), sse("[DONE]")]
