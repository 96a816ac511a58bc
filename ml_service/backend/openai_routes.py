"""The OpenAI-compatible routes: `GET /v1/models` (and `/v1/models/{id}`), `POST /v1/completions`,
`POST /v1/chat/completions`. Thin, like `api.py`: read and validate the body, hand it to a serving
object (`openai_completions.py`, `openai_chat.py`), return its answer.

Same engine, limits, keys (`Authorization: Bearer`), metrics, versions and logs as `/forward`;
errors in OpenAI's shape (`backend/errors.py` decides them, by path). Unknown request fields are
ignored and logged at debug level, so newer clients keep working.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from ml_service.backend.bodies import read_json_request, validated
from ml_service.backend.dependencies import DepsDep
from ml_service.backend.errors import MODEL_ROUTE_ERRORS, openapi_responses
from ml_service.backend.openai_chat import OpenAIServingChat
from ml_service.backend.openai_completions import OpenAIServingCompletion
from ml_service.backend.openai_protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
)
from ml_service.backend.openai_serving import list_models, retrieve_model
from ml_service.backend.openapi import json_body
from ml_service.backend.security import require_api_key

ERRORS = openapi_responses(*MODEL_ROUTE_ERRORS, openai=True)  # OpenAI's bodies and statuses
# with `stream`, the 200 is an event stream: before OpenAPI 3.2 (`itemSchema`) an event stream's
# `schema` describes one event (its `data`: a JSON chunk, or `[DONE]`)
STREAMED = {
    **ERRORS,
    200: {
        "description": "the response (JSON), or with `stream` a `text/event-stream` of chunks",
        "content": {
            "text/event-stream": {
                "schema": {
                    "type": "object",
                    "properties": {"data": {"type": "string"}, "event": {"type": "string"}},
                    "required": ["data"],
                }
            }
        },
    },
}
# read from the path by the route itself: a declared parameter would bring FastAPI's 422
MODEL_ID = {
    "parameters": [
        {
            "name": "model_id",
            "in": "path",
            "required": True,
            "schema": {"type": "string"},
            "description": "an id from /v1/models",
        }
    ]
}


def build_openai_router() -> APIRouter:
    router = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)], tags=["OpenAI"])

    @router.get("/models", response_model=ModelList, responses=ERRORS, summary="served models")
    async def models(deps: DepsDep) -> ModelList:
        """The served model's id and, with model versions, the version serving it; each with
        its context length and the chat template in use."""
        return list_models(deps)

    @router.get(
        "/models/{model_id:path}",  # `:path`: an id may hold a `/` (`org/name`)
        response_model=ModelCard,
        responses=ERRORS,
        openapi_extra=MODEL_ID,
        summary="one model",
    )
    async def model(request: Request, deps: DepsDep) -> ModelCard:
        """The card `/v1/models` lists for `model_id` (the OpenAI SDK's `models.retrieve`); 404
        `model_not_found` for an id not served here."""
        return retrieve_model(deps, request.path_params["model_id"])

    @router.post(
        "/completions",
        response_model=CompletionResponse,
        responses=STREAMED,
        openapi_extra=json_body(CompletionRequest),
        summary="text completion (OpenAI)",
    )
    async def completions(request: Request, deps: DepsDep):
        """OpenAI's completions: `prompt` as text, texts, token ids or lists of them; `n`,
        `stop`, `seed`, `logprobs` with `echo` (the prompt's log-probabilities too; with
        `max_tokens: 0`, only those), penalties, `logit_bias`, streaming."""
        req = validated(CompletionRequest, await read_json_request(request, "/v1/completions"))
        return await OpenAIServingCompletion(request, deps, req.model).create(req)

    @router.post(
        "/chat/completions",
        response_model=ChatCompletionResponse,
        responses=STREAMED,
        openapi_extra=json_body(ChatCompletionRequest),
        summary="chat completion (OpenAI)",
    )
    async def chat(request: Request, deps: DepsDep):
        """OpenAI's chat completions. The messages are rendered with the checkpoint's chat
        template, or the fallback `/v1/models` shows (the default model was not trained on
        dialogues: expect a continuation, not an assistant)."""
        body = await read_json_request(request, "/v1/chat/completions")
        req = validated(ChatCompletionRequest, body)
        return await OpenAIServingChat(request, deps, req.model).create(req)

    return router
