"""The OpenAI-compatible routes: `GET /v1/models`, `POST /v1/completions`,
`POST /v1/chat/completions`. Thin, like `api.py`: parse, check, hand to `openai_serving`.

Same engine, limits, keys (`Authorization: Bearer`), metrics, versions and logs as `/forward`;
errors in OpenAI's shape (`backend/errors.py` decides them, by path). Unknown request fields are
ignored and logged at debug level, so newer clients keep working.
"""

from __future__ import annotations

import logging

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ValidationError

from ml_service.backend import openai_serving as serving
from ml_service.backend.api import _json_body, check_room, read_json_object, stream_items
from ml_service.backend.dependencies import DepsDep
from ml_service.backend.errors import (
    MODEL_ROUTE_ERRORS,
    BadRequest,
    openapi_responses,
    pydantic_errors,
)
from ml_service.backend.openai_protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ModelList,
)
from ml_service.backend.security import require_api_key

log = logging.getLogger("ml_service")
ERRORS = openapi_responses(*MODEL_ROUTE_ERRORS, openai=True)  # OpenAI's bodies and statuses
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def parse(model: type[BaseModel], payload: dict) -> BaseModel:
    unknown = sorted(set(payload) - set(model.model_fields))
    if unknown:
        log.debug("%s: ignoring unknown fields %s", model.__name__, unknown)
    try:
        return model.model_validate(payload)
    except ValidationError as e:
        raise BadRequest(pydantic_errors(e)) from None


def build_openai_router() -> APIRouter:
    router = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)], tags=["OpenAI"])

    @router.get("/models", response_model=ModelList, responses=ERRORS, summary="served models")
    async def models(deps: DepsDep) -> ModelList:
        """The served model's id and, with model versions, the version serving it; each with
        its context length and the chat template in use."""
        cards = [
            card for loaded in serving.all_loaded(deps) for card in serving.model_cards(loaded)
        ]
        return ModelList(data=list({card.id: card for card in cards}.values()))

    @router.post(
        "/completions",
        response_model=CompletionResponse,
        responses=ERRORS,
        openapi_extra=_json_body(CompletionRequest),
        summary="text completion (OpenAI)",
    )
    async def completions(request: Request, deps: DepsDep):
        """OpenAI's completions: `prompt` as text, texts, token ids or lists of them; `n`,
        `stop`, `seed`, `logprobs` with `echo` (the prompt's log-probabilities too; with
        `max_tokens: 0`, only those), penalties, `logit_bias`, streaming."""
        req = parse(CompletionRequest, await read_json_object(request))
        loaded = serving.requested_model(deps, req.model)
        prompts = serving.completion_prompts(req, loaded)
        if req.stream and req.logprobs is not None:
            raise BadRequest.one("logprobs", "logprobs are not streamed; send stream: false")
        if req.max_tokens == 0:
            outputs = serving.scored_only(prompts, req.n)
            return await serving.completion_response(request, req, loaded, prompts, outputs)
        items = serving.engine_items(req, prompts, loaded, req.max_tokens, req.logprobs, "prompt")
        if req.stream:
            return await _stream_completion(request, deps, req, loaded, prompts, items)
        outputs = await serving.generate(request, deps, loaded, items, req.cache)
        return await serving.completion_response(request, req, loaded, prompts, outputs)

    @router.post(
        "/chat/completions",
        response_model=ChatCompletionResponse,
        responses=ERRORS,
        openapi_extra=_json_body(ChatCompletionRequest),
        summary="chat completion (OpenAI)",
    )
    async def chat(request: Request, deps: DepsDep):
        """OpenAI's chat completions. The messages are rendered with the checkpoint's chat
        template, or the fallback `/v1/models` shows (the default model was not trained on
        dialogues: expect a continuation, not an assistant)."""
        req = parse(ChatCompletionRequest, await read_json_object(request))
        loaded = serving.requested_model(deps, req.model)
        if req.stream and req.logprobs:
            raise BadRequest.one("logprobs", "logprobs are not streamed; send stream: false")
        prompt = serving.chat_prompt(req, loaded)
        top = (req.top_logprobs or 0) if req.logprobs else None
        fallback = loaded.service.inference.tokenizer.chat_template is None
        extra_stop = (serving.FALLBACK_STOP,) if fallback else ()
        asked = req.asked_tokens()
        items = serving.engine_items(req, [prompt], loaded, asked, top, "messages", extra_stop)
        if req.stream:
            return await _stream_chat(request, deps, req, loaded, prompt, items)
        outputs = await serving.generate(request, deps, loaded, items, req.cache)
        return serving.chat_response(req, loaded, prompt, outputs)

    return router


async def _stream(request, deps, req, loaded, prompts, items, prefix: str, obj: str, choice):
    """The streamed answer: `choice(i, text, finish, first)` shapes one choice of a chunk
    (`first`: the choice's first piece); the chunks share one id and header fields."""
    check_room(loaded.engine, len(items))
    # queued now (a full queue is a 503), or cached answers as streams
    streams = await stream_items(request, deps, loaded, items, req.cache)
    base = {**serving.response_header(loaded, prefix), "object": obj}
    started: set[int] = set()
    include_usage = req.stream_options is not None and req.stream_options.include_usage

    def chunk(i: int, text: str, result) -> dict:
        first = i not in started
        started.add(i)
        finish = None if result is None else serving.FINISH[result.finish_reason]
        return {**base, "choices": [choice(i, text, finish, first)]}

    def usage_chunk(outputs) -> dict | None:
        if not include_usage:
            return None
        return {**base, "choices": [], "usage": serving.usage(prompts, outputs).model_dump()}

    body = serving.stream_chunks(
        request, loaded, streams, chunk, usage_chunk, deps.settings.request_timeout_s, deps.metrics
    )
    return StreamingResponse(body, media_type="text/event-stream", headers=SSE_HEADERS)


async def _stream_completion(request, deps, req, loaded, prompts, items) -> StreamingResponse:
    def choice(i: int, text: str, finish, first: bool) -> dict:
        if req.echo and first:  # the prompt comes first, with the choice's first piece
            text = prompts[i // req.n].text + text
        return {"index": i, "text": text, "logprobs": None, "finish_reason": finish}

    return await _stream(
        request, deps, req, loaded, prompts, items, "cmpl", "text_completion", choice
    )


async def _stream_chat(request, deps, req, loaded, prompt, items) -> StreamingResponse:
    def choice(i: int, text: str, finish, first: bool) -> dict:
        delta = {"role": "assistant", "content": text} if first else {"content": text}
        return {"index": i, "delta": delta, "logprobs": None, "finish_reason": finish}

    obj = "chat.completion.chunk"
    return await _stream(request, deps, req, loaded, [prompt], items, "chatcmpl", obj, choice)
