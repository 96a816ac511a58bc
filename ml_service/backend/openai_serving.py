"""OpenAI requests into engine calls, and engine results into OpenAI responses (vLLM's
`serving_completion.py` / `serving_chat.py` in one small module). The engine, limits, keys,
metrics and logs are the ones `/forward` uses; only the shapes differ.

- `n` choices per prompt are separate rows of the same batch; with a `seed`, the choice at index
  `i` (prompt p, choice c: i = p * n + c, OpenAI's order) samples with `seed + i`.
- Chat messages are rendered with the checkpoint's own chat template, or with `FALLBACK_TEMPLATE`
  (a plain "Пользователь: / Ассистент:" transcript; the default model never saw dialogues), and
  then the fallback's stop string keeps the model from writing the user's next turn.
- `logprobs` are the model's raw log-probabilities (before penalties and temperature), as vLLM's
  default; they are not streamed (a streamed request that asks for them is a 400).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, replace

from fastapi import Request

from lib.inference import (
    GenerationParams,
    GenerationResult,
    InvalidTokens,
    PromptTooLong,
    TokenLogprob,
)
from lib.tokenizer import token_bytes
from ml_service.backend.api import check_room, note_usage, run_items
from ml_service.backend.errors import BadRequest, ModelNotFound, as_service_error
from ml_service.backend.openai_protocol import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    SamplingRequest,
    TokenLogprobEntry,
    TopLogprob,
    UsageInfo,
)
from ml_service.hosting import Loaded

log = logging.getLogger("ml_service")
OWNER = "ml_service"
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
FINISH = {"eos": "stop", "stop": "stop", "length": "length", "cancelled": "stop"}


# -- models --------------------------------------------------------------------------------------
def _version(loaded: Loaded) -> str | None:
    """The serving version, when versions are served (ML_SERVICE_MODELS_DIR)."""
    return loaded.version if loaded.service.settings.models_dir is not None else None


def model_ids(loaded: Loaded) -> list[str]:
    """The ids a request may name: the model's, and the version serving it when there is one."""
    ids = [loaded.service.model_id]
    if (version := _version(loaded)) and version not in ids:
        ids.append(version)
    return ids


def served_name(loaded: Loaded) -> str:
    """What responses call the model: the version that served it (or the model id)."""
    return _version(loaded) or loaded.service.model_id


def chat_template(loaded: Loaded) -> str:
    return loaded.service.inference.tokenizer.chat_template or FALLBACK_TEMPLATE


def model_cards(loaded: Loaded) -> list[ModelCard]:
    inference = loaded.service.inference
    created = int(loaded.created)
    return [
        ModelCard(
            id=name,
            created=created,
            owned_by=OWNER,
            context_length=inference.context_length,
            version=_version(loaded),
            chat_template=chat_template(loaded),
        )
        for name in model_ids(loaded)
    ]


def requested_model(deps, requested: str | None) -> Loaded:
    """The version a request's `model` names: the model id (or omitted) leaves the choice to the
    traffic split (`deps.model`); a loaded version's name pins that version."""
    if requested is None or requested in model_ids(deps.model):
        return deps.model
    if requested in deps.host.loaded and deps.settings.models_dir is not None:
        return deps.pin(requested)
    served = ", ".join(dict.fromkeys(i for v in all_loaded(deps) for i in model_ids(v)))
    raise ModelNotFound([{"loc": ["model"], "msg": f"{requested!r} is not served here ({served})"}])


def all_loaded(deps) -> list[Loaded]:
    """The versions a request may name: the one chosen for it first, then the others loaded."""
    others = [v for name, v in sorted(deps.host.loaded.items()) if v is not deps.model]
    return [deps.model, *others]


# -- requests into engine items ------------------------------------------------------------------
@dataclass
class Prompt:
    ids: list[int]  # without the leading end-of-document token
    text: str


def _refuse(param: str, msg: str) -> BadRequest:
    return BadRequest([{"loc": param.split("."), "msg": msg}])


def _tokens_asked(req: SamplingRequest, asked: int | None, loaded: Loaded, prompt_len: int) -> int:
    """max_tokens as asked (checked against the limit), or what fits when it is not given."""
    limit = loaded.service.max_new_tokens()  # /metadata's limits.max_new_tokens
    if asked is None:  # chat without a limit: the service's default, within the context
        room = loaded.service.inference.context_length - prompt_len
        return max(1, min(GenerationParams().max_new_tokens, limit, room))
    if asked > limit:
        raise _refuse("max_tokens", f"must be <= {limit}")
    return asked


def completion_prompts(req: CompletionRequest, loaded: Loaded) -> list[Prompt]:
    tok = loaded.service.inference.tokenizer
    limit = loaded.service.settings.max_text_chars
    prompts = []
    for i, p in enumerate(req.prompts()):
        if isinstance(p, str):
            if len(p) > limit:
                raise _refuse("prompt", f"prompt {i} has {len(p)} characters; the limit is {limit}")
            prompts.append(Prompt(tok(p)["input_ids"], p))
        else:  # ids are checked before the tokenizer sees them (it overflows on huge ones)
            vocab = loaded.service.inference.vocab_size
            if bad := next((t for t in p if t >= vocab), None):
                raise _refuse(
                    "prompt", f"prompt {i}: token id {bad} is outside the vocabulary [0, {vocab})"
                )
            prompts.append(Prompt(list(p), tok.decode(p)))
    return prompts


def chat_prompt(req: ChatCompletionRequest, loaded: Loaded) -> Prompt:
    tok = loaded.service.inference.tokenizer
    messages = [{"role": m.role, "content": m.text()} for m in req.messages]
    text = tok.apply_chat_template(
        messages, chat_template=chat_template(loaded), tokenize=False, add_generation_prompt=True
    )
    limit = loaded.service.settings.max_text_chars
    if len(text) > limit:
        raise _refuse(
            "messages", f"the conversation has {len(text)} characters; the limit is {limit}"
        )
    return Prompt(tok(text)["input_ids"], text)


def engine_items(
    req: SamplingRequest,
    prompts: Sequence[Prompt],
    loaded: Loaded,
    asked: int | None,
    logprobs: int | None,
    param: str,
    extra_stop: tuple[str, ...] = (),
) -> list:
    """One engine item per choice (prompt-major), each checked to fit the context."""
    inference = loaded.service.inference
    total = len(prompts) * req.n
    if total > (limit := loaded.service.batch_limit()):
        raise _refuse("n", f"{total} choices in one request; the limit is {limit}")
    items = []
    for p, prompt in enumerate(prompts):
        new = _tokens_asked(req, asked, loaded, len(prompt.ids))
        for c in range(req.n):
            params = req.params(new, logprobs, req.choice_seed(p * req.n + c))
            if extra_stop and len(params.stop) < 8:
                params = _with_stop(params, extra_stop)
            try:
                items.append(inference.prepare_ids(prompt.ids, params))
            except PromptTooLong as e:
                raise _refuse(param, str(e)) from None
            except InvalidTokens as e:
                raise _refuse(param, str(e)) from None
    return items


def _with_stop(params, extra: tuple[str, ...]):
    return replace(params, stop=params.stop + tuple(s for s in extra if s not in params.stop))


async def generate(request: Request, deps, loaded: Loaded, items: list, opted_in: bool):
    check_room(loaded.engine, len(items))
    return await run_items(request, deps, loaded, items, opted_in)


# -- results into responses ----------------------------------------------------------------------
def response_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def response_header(loaded: Loaded, prefix: str) -> dict:
    """The fields every response (and every chunk of one stream) starts with: a new id with
    `prefix`, the time, the served model and its fingerprint."""
    return {
        "id": response_id(prefix),
        "created": int(time.time()),
        "model": served_name(loaded),
        "system_fingerprint": fingerprint(loaded),
    }


def usage(prompts: Sequence[Prompt], outputs: Sequence[GenerationResult]) -> UsageInfo:
    prompt_tokens = sum(len(p.ids) for p in prompts)  # once per prompt, whatever n is
    completion = sum(o.completion_tokens for o in outputs)
    return UsageInfo(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion,
        total_tokens=prompt_tokens + completion,
    )


def token_text(tokenizer, token_id: int) -> str:
    return token_bytes(tokenizer, token_id).decode("utf-8", errors="replace")


def completion_logprobs(
    tokenizer, entries: Sequence[TokenLogprob | None], ids: Sequence[int]
) -> CompletionLogprobs:
    tokens, values, tops, offsets, at = [], [], [], [], 0
    for token_id, entry in zip(ids, entries, strict=True):
        text = token_text(tokenizer, token_id)
        tokens.append(text)
        offsets.append(at)
        at += len(text)
        values.append(None if entry is None else entry.logprob)
        tops.append(
            None
            if entry is None
            else {
                token_text(tokenizer, t): lp
                for t, lp in [(entry.token_id, entry.logprob), *entry.top]
            }
        )
    return CompletionLogprobs(
        tokens=tokens, token_logprobs=values, top_logprobs=tops, text_offset=offsets
    )


def chat_logprobs(tokenizer, entries: Sequence[TokenLogprob]) -> ChatLogprobs:
    def top(token_id: int, lp: float) -> TopLogprob:
        raw = token_bytes(tokenizer, token_id)
        return TopLogprob(token=raw.decode("utf-8", errors="replace"), logprob=lp, bytes=list(raw))

    content = []
    for e in entries:
        first = top(e.token_id, e.logprob)
        content.append(
            TokenLogprobEntry(**first.model_dump(), top_logprobs=[top(t, lp) for t, lp in e.top])
        )
    return ChatLogprobs(content=content)


async def completion_response(
    request: Request,
    req: CompletionRequest,
    loaded: Loaded,
    prompts: list[Prompt],
    outputs: list[GenerationResult],
) -> CompletionResponse:
    inference = loaded.service.inference
    tok = inference.tokenizer
    choices = []
    prompt_scores: dict[int, list] = {}
    for index, out in enumerate(outputs):
        prompt = prompts[index // req.n]
        text = (prompt.text if req.echo else "") + out.text
        logprobs = None
        if req.logprobs is not None:
            entries, ids = list(out.logprobs or []), list(out.token_ids)
            if req.echo:
                p = index // req.n
                if p not in prompt_scores:  # scored once per prompt, off the event loop
                    prompt_scores[p] = await asyncio.to_thread(
                        inference.prompt_logprobs, prompt.ids, req.logprobs
                    )
                entries, ids = prompt_scores[p] + entries, prompt.ids + ids
            logprobs = completion_logprobs(tok, entries, ids)
        choices.append(
            CompletionChoice(
                index=index, text=text, logprobs=logprobs, finish_reason=FINISH[out.finish_reason]
            )
        )
    return CompletionResponse(
        **response_header(loaded, "cmpl"), choices=choices, usage=usage(prompts, outputs)
    )


def scored_only(prompts: list[Prompt], n: int) -> list[GenerationResult]:
    """`max_tokens: 0` with `echo`: nothing is generated."""
    return [GenerationResult("", "length", len(p.ids), 0) for p in prompts for _ in range(n)]


def chat_response(
    req: ChatCompletionRequest, loaded: Loaded, prompt: Prompt, outputs: list[GenerationResult]
) -> ChatCompletionResponse:
    tok = loaded.service.inference.tokenizer
    choices = [
        ChatChoice(
            index=i,
            message=AssistantMessage(content=out.text),
            logprobs=chat_logprobs(tok, out.logprobs or []) if req.logprobs else None,
            finish_reason=FINISH[out.finish_reason],
        )
        for i, out in enumerate(outputs)
    ]
    return ChatCompletionResponse(
        **response_header(loaded, "chatcmpl"), choices=choices, usage=usage([prompt], outputs)
    )


def fingerprint(loaded: Loaded) -> str:
    return served_name(loaded)


# -- streaming -----------------------------------------------------------------------------------
def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


async def merged(streams: list) -> AsyncIterator[tuple[int, object]]:
    """(choice index, event) from several TokenStreams, as they come."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, stream) -> None:
        try:
            async for event in stream:
                await queue.put((i, event))
        except BaseException as e:  # ends that stream's choice; the others go on
            await queue.put((i, e))
        finally:
            await queue.put((i, None))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    left = len(streams)
    try:
        while left:
            i, event = await queue.get()
            if event is None:
                left -= 1
            else:
                yield i, event
    finally:
        for t in tasks:
            t.cancel()
        for s in streams:
            s.cancel()


async def stream_chunks(
    request: Request,
    loaded: Loaded,
    streams: list,
    chunk,
    usage_chunk,
    timeout: float,
    metrics,
) -> AsyncIterator[str]:
    """The SSE body of a streamed completion or chat: `chunk(i, text, result)` per piece (the
    result, with its finish reason, on a choice's last piece), `usage_chunk(results)` (None: not
    asked), then `[DONE]`. A failure ends the stream with an OpenAI-shaped error event (and is
    counted, as /forward's streams are)."""
    expiry = asyncio.get_running_loop().call_later(
        timeout, lambda: [s.interrupt(TimeoutError()) for s in streams]
    )
    results: dict[int, GenerationResult] = {}
    held: dict[int, str] = {}  # each choice's newest piece: the last one carries finish_reason
    failure = "cancelled"
    try:
        async for i, event in merged(streams):
            if isinstance(event, BaseException):
                raise event
            if isinstance(event, str):
                if i in held:
                    yield sse(chunk(i, held[i], None))
                held[i] = event
            else:
                results[i] = event
                yield sse(chunk(i, held.pop(i, ""), event))
        failure = None
        outputs = [results[i] for i in sorted(results)]
        note_usage(request, outputs)
        if (extra := usage_chunk(outputs)) is not None:
            yield sse(extra)
        yield sse("[DONE]")
    except Exception as e:
        error = as_service_error(e)
        failure = error.reason
        yield sse(error.openai_body())
        yield sse("[DONE]")
    finally:
        expiry.cancel()
        for s in streams:
            s.cancel()
        if failure is not None and metrics is not None:
            metrics.failures.labels(reason=failure).inc()
