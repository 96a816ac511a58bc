"""Routes. Thin: parse and validate at the edge, call `InferenceService` off the event loop, answer."""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Request
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from lib.inference import GenerationParams
from ml_service import __version__
from ml_service.backend.dependencies import ServiceDep, SettingsDep
from ml_service.backend.errors import BadRequest, pydantic_errors
from ml_service.backend.schemas import (
    Completion,
    ErrorResponse,
    ForwardBatchRequest,
    ForwardBatchResponse,
    ForwardRequest,
    ForwardResponse,
    GenerationOptions,
    HealthResponse,
)
from ml_service.settings import Settings

router = APIRouter()

ERRORS: dict[int | str, dict[str, Any]] = {
    400: {
        "model": ErrorResponse,
        "description": "bad request: the `errors` list says what is wrong",
    },
    403: {"model": ErrorResponse, "description": "the model failed to process valid input"},
}

_options_schema = GenerationOptions.model_json_schema()["properties"]
FORWARD_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": ForwardRequest.model_json_schema()},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "description": "give `text` or a UTF-8 text `file`, plus any generation parameter as a form field",
                    "properties": {
                        "text": {"type": "string"},
                        "file": {"type": "string", "format": "binary"},
                        **{k: v for k, v in _options_schema.items() if k != "stop"},
                        "stop": {"type": "array", "items": {"type": "string"}},
                    },
                }
            },
        },
    }
}


async def parse_forward_request(request: Request, settings: Settings) -> ForwardRequest:
    """A ForwardRequest from a JSON body or a multipart/urlencoded form, or BadRequest."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "application/json":
        payload = await read_json_object(request)
    elif content_type in ("multipart/form-data", "application/x-www-form-urlencoded"):
        payload = await read_form(request, settings)
    else:
        raise BadRequest.one(
            "content-type",
            f"unsupported content type {content_type or '(none)'!r}; "
            "send application/json or multipart/form-data",
        )
    try:
        req = ForwardRequest.model_validate(payload)
    except ValidationError as e:
        raise BadRequest(pydantic_errors(e)) from None
    check_limits([req.text], req, settings)
    return req


async def read_json_object(request: Request) -> dict:
    body = await request.body()
    try:
        payload = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadRequest.one("body", f"malformed JSON: {e}") from None
    if not isinstance(payload, dict):
        raise BadRequest.one("body", "the JSON body must be an object")
    return payload


async def read_form(request: Request, settings: Settings) -> dict:
    try:
        form = await request.form(max_files=1, max_fields=32)
    except Exception as e:  # malformed multipart bodies raise several starlette/multipart errors
        raise BadRequest.one("body", f"malformed form data: {e}") from None
    payload: dict[str, Any] = {}
    for key in form.keys():
        values = form.getlist(key)
        if key == "file":
            continue
        if any(isinstance(v, UploadFile) for v in values):
            raise BadRequest.one(key, "only the field 'file' may be a file")
        payload[key] = list(values) if key == "stop" else values[-1]
    upload = form.get("file")
    if upload is not None:
        if not isinstance(upload, UploadFile):
            raise BadRequest.one("file", "'file' must be an uploaded file")
        if "text" in payload:
            raise BadRequest.one("file", "send either 'text' or 'file', not both")
        data = await upload.read(settings.max_file_bytes + 1)
        if len(data) > settings.max_file_bytes:
            raise BadRequest.one("file", f"file is larger than {settings.max_file_bytes} bytes")
        try:
            payload["text"] = data.decode("utf-8")
        except UnicodeDecodeError:
            raise BadRequest.one("file", "file is not valid UTF-8 text") from None
    return payload


def check_limits(texts: list[str], options: GenerationOptions, settings: Settings) -> None:
    errors = []
    if options.max_new_tokens > settings.max_new_tokens_limit:
        errors.append(
            {
                "loc": ["max_new_tokens"],
                "msg": f"max_new_tokens must be <= {settings.max_new_tokens_limit}",
            }
        )
    for i, t in enumerate(texts):
        if len(t) > settings.max_text_chars:
            errors.append(
                {
                    "loc": ["text" if len(texts) == 1 else f"texts.{i}"],
                    "msg": f"text has {len(t)} characters; the limit is {settings.max_text_chars}",
                }
            )
    if errors:
        raise BadRequest(errors)


@router.post(
    "/forward", response_model=ForwardResponse, responses=ERRORS, openapi_extra=FORWARD_BODY
)
async def forward(request: Request, service: ServiceDep, settings: SettingsDep) -> ForwardResponse:
    """Generate a continuation of one text.

    Send JSON (`{"text": "Привет, мир!", "max_new_tokens": 32}`) or multipart/form-data (a `text`
    field or a UTF-8 text `file`, and the same parameters as form fields).
    """
    req = await parse_forward_request(request, settings)
    params = req.to_generation_params()
    service.validate([req.text], [params])
    result = (await run_in_threadpool(service.generate_batch, [req.text], params))[0]
    return ForwardResponse(model=service.model_id, **Completion.from_result(result).model_dump())


@router.post("/forward_batch", response_model=ForwardBatchResponse, responses=ERRORS)
async def forward_batch(
    request: Request, service: ServiceDep, settings: SettingsDep
) -> ForwardBatchResponse:
    """Generate a continuation for each of `texts` (at most `max_batch_size`, see /metadata), in order.

    The generation parameters apply to every text; a `seed` makes every row reproducible.
    """
    payload = await read_json_object(request) if _is_json(request) else _not_json(request)
    try:
        req = ForwardBatchRequest.model_validate(payload)
    except ValidationError as e:
        raise BadRequest(pydantic_errors(e)) from None
    if len(req.texts) > settings.max_batch_size:
        raise BadRequest.one(
            "texts", f"{len(req.texts)} texts; the limit is {settings.max_batch_size}"
        )
    check_limits(req.texts, req, settings)
    params = _per_row_params(req.to_generation_params(), len(req.texts))
    service.validate(req.texts, params)
    results = await run_in_threadpool(service.generate_batch, req.texts, params)
    return ForwardBatchResponse(
        model=service.model_id, results=[Completion.from_result(r) for r in results]
    )


def _per_row_params(params: GenerationParams, n: int) -> list[GenerationParams]:
    """A seeded batch gives row i the seed + i, so rows differ but the batch is reproducible."""
    if params.seed is None:
        return [params] * n
    from dataclasses import replace

    return [replace(params, seed=(params.seed + i) % 2**63) for i in range(n)]


def _is_json(request: Request) -> bool:
    return (
        request.headers.get("content-type", "").split(";")[0].strip().lower() == "application/json"
    )


def _not_json(request: Request) -> dict:
    ct = request.headers.get("content-type", "").split(";")[0].strip() or "(none)"
    raise BadRequest.one(
        "content-type", f"unsupported content type {ct!r}; /forward_batch takes application/json"
    )


@router.get("/metadata")
async def metadata(service: ServiceDep, settings: SettingsDep) -> dict:
    """The loaded model (id, preset, parameters, context, vocabulary, dtype, device, training card),
    the request limits and the service version."""
    return {
        **service.metadata(),
        "limits": {
            "max_batch_size": settings.max_batch_size,
            "max_new_tokens": min(settings.max_new_tokens_limit, service.context_length - 1),
            "max_text_chars": settings.max_text_chars,
            "max_file_bytes": settings.max_file_bytes,
            "context_length": service.context_length,
        },
        "service_version": __version__,
    }


@router.get("/health", response_model=HealthResponse)
async def health() -> HealthResponse:
    """Liveness: the process answers (also while the model is generating)."""
    return HealthResponse(status="ok")
