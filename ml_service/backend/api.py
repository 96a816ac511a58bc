"""Routes, generic over the loaded `ModelService`. Thin: parse and validate at the edge, refuse
at once when the queue is full, `preprocess`, hand to the service's engine (which runs the model
off the event loop), `postprocess`. A client that disconnects cancels its work."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.datastructures import UploadFile

from lib.inference import GenerationFailed
from ml_service import __version__
from ml_service.backend.dependencies import AppDependencies, DepsDep
from ml_service.backend.errors import (
    MODEL_FAILED,
    BadRequest,
    ClientDisconnected,
    Overloaded,
    pydantic_errors,
)
from ml_service.backend.schemas import ErrorResponse, HealthResponse
from ml_service.contract import InvalidInput, ModelService
from ml_service.settings import Settings

ERRORS: dict[int | str, dict[str, Any]] = {
    400: {
        "model": ErrorResponse,
        "description": "bad request: the `errors` list says what is wrong",
    },
    403: {"model": ErrorResponse, "description": "the model failed to process valid input"},
    503: {
        "model": ErrorResponse,
        "description": "the queue is full: retry after `Retry-After` seconds",
    },
}
log = logging.getLogger("ml_service")
STREAM_DOC = (
    '\n\nWith `"stream": true` the answer is `text/event-stream`: `token` events '
    '(`{"text": piece}`) as text is generated, then one `done` event with the response below '
    '(or an `error` event `{"detail": ...}`).'
)


def build_router(service_cls: type[ModelService]) -> APIRouter:
    """/forward, /forward_batch, /metadata and /health for one service class."""
    router = APIRouter()
    req_model, batch_model = service_cls.request_model, service_cls.batch_request_model
    array_fields = _array_fields(req_model)
    takes_text = "text" in req_model.model_fields
    streams = "stream" in req_model.model_fields

    @router.post(
        "/forward",
        response_model=service_cls.response_model,
        responses=ERRORS,
        openapi_extra=_forward_body(req_model, takes_text),
        summary=f"{service_cls.name}: one input",
        description=f"{service_cls.description}.\n\nSend JSON, or multipart/form-data with the same "
        "fields as form fields"
        + (" (a UTF-8 text `file` may replace `text`)." if takes_text else ".")
        + (STREAM_DOC if streams else ""),
    )
    async def forward(request: Request, deps: DepsDep):
        payload = await read_body(request, deps.settings, array_fields, takes_text)
        req = _validate(req_model, payload)
        _check_room(deps, 1)
        item = deps.service.preprocess(req)
        if streams and req.stream:
            events = deps.engine.stream(item)  # queued now: a full queue is still a plain 503
            return StreamingResponse(
                _sse(events, deps, req),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        output = await _unless_disconnected(request, deps.engine.submit(item))
        return deps.service.postprocess(output, req)

    @router.post(
        "/forward_batch",
        response_model=service_cls.batch_response_model,
        responses=ERRORS,
        summary=f"{service_cls.name}: several inputs",
        description="One result per input, in order (JSON only). The inputs share model batches; "
        "the batch size limit is in /metadata.",
    )
    async def forward_batch(request: Request, deps: DepsDep):
        if _content_type(request) != "application/json":
            raise BadRequest.one(
                "content-type",
                f"unsupported content type {_content_type(request) or '(none)'!r}; "
                "/forward_batch takes application/json",
            )
        batch_req = _validate(batch_model, await read_json_object(request))
        requests = deps.service.split_batch(batch_req)
        _check_room(deps, len(requests))
        items = []
        for i, req in enumerate(requests):
            try:
                items.append(deps.service.preprocess(req))
            except InvalidInput as e:
                raise BadRequest([{"loc": [str(i), e.loc], "msg": str(e)}]) from None
        outputs = await _unless_disconnected(request, deps.engine.submit_many(items))
        return deps.service.batch_response(
            [deps.service.postprocess(o, r) for o, r in zip(outputs, requests, strict=True)]
        )

    @router.get("/metadata", summary="the loaded model, its limits and the service version")
    async def metadata(deps: DepsDep) -> dict:
        """The service (name, description), the model (id, preset, parameters, context, vocabulary,
        dtype, device, training card), the request limits and the service version."""
        return {**deps.service.metadata(), "service_version": __version__}

    @router.get("/health", response_model=HealthResponse, summary="liveness")
    async def health() -> HealthResponse:
        """The process answers (also while the model is busy)."""
        return HealthResponse(status="ok")

    return router


def _check_room(deps: AppDependencies, n: int) -> None:
    """503 before any tokenization or model work when the queue cannot take `n` more."""
    if not deps.engine.has_room(n):
        raise Overloaded([{"loc": ["queue"], "msg": "the request queue is full"}])


async def _unless_disconnected(request: Request, work: Awaitable) -> Any:
    """Await `work`, cancelling it (and so its rows in the engine) if the client disconnects."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
    if task.cancelled():
        log.info("client disconnected from %s: its generation was cancelled", request.url.path)
        raise ClientDisconnected()
    return task.result()


async def _sse(events, deps: AppDependencies, req: BaseModel) -> AsyncIterator[str]:
    """Server-Sent Events for one streamed generation (closing the stream cancels it)."""
    try:
        async for event in events:
            if isinstance(event, str):
                yield _event("token", {"text": event})
            else:
                yield _event("done", deps.service.postprocess(event, req).model_dump())
    except GenerationFailed:
        yield _event("error", {"detail": MODEL_FAILED})
    except Exception:
        log.exception("stream failed")
        yield _event("error", {"detail": "internal server error"})


def _event(name: str, data: dict) -> str:
    return f"event: {name}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"


def _validate(model: type[BaseModel], payload: dict) -> BaseModel:
    try:
        return model.model_validate(payload)
    except ValidationError as e:
        raise BadRequest(pydantic_errors(e)) from None


def _content_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def read_body(
    request: Request, settings: Settings, array_fields: set[str], takes_text: bool
) -> dict:
    """A dict from a JSON object or a multipart/urlencoded form, or BadRequest."""
    ct = _content_type(request)
    if ct == "application/json":
        return await read_json_object(request)
    if ct in ("multipart/form-data", "application/x-www-form-urlencoded"):
        return await read_form(request, settings, array_fields, takes_text)
    raise BadRequest.one(
        "content-type",
        f"unsupported content type {ct or '(none)'!r}; send application/json or multipart/form-data",
    )


async def read_json_object(request: Request) -> dict:
    body = await request.body()
    try:
        payload = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadRequest.one("body", f"malformed JSON: {e}") from None
    if not isinstance(payload, dict):
        raise BadRequest.one("body", "the JSON body must be an object")
    return payload


async def read_form(
    request: Request, settings: Settings, array_fields: set[str], takes_text: bool
) -> dict:
    try:
        form = await request.form(max_files=1, max_fields=32)
    except Exception as e:  # malformed multipart bodies raise several starlette/multipart errors
        raise BadRequest.one("body", f"malformed form data: {e}") from None
    payload: dict[str, Any] = {}
    for key in form.keys():
        values = form.getlist(key)
        if key == "file" and takes_text:
            continue
        if any(isinstance(v, UploadFile) for v in values):
            raise BadRequest.one(
                key,
                "only the field 'file' may be a file" if takes_text else "files are not accepted",
            )
        payload[key] = list(values) if key in array_fields else values[-1]
    upload = form.get("file") if takes_text else None
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


def _array_fields(model: type[BaseModel]) -> set[str]:
    """Fields that take a list: a repeated form field fills them."""
    props = model.model_json_schema().get("properties", {})
    return {
        name
        for name, p in props.items()
        if p.get("type") == "array" or any(a.get("type") == "array" for a in p.get("anyOf", []))
    }


def _forward_body(model: type[BaseModel], takes_text: bool) -> dict:
    schema = model.model_json_schema()
    form_props = {
        k: ({"type": "array", "items": {"type": "string"}} if k in _array_fields(model) else v)
        for k, v in schema.get("properties", {}).items()
    }
    if takes_text:
        form_props["file"] = {
            "type": "string",
            "format": "binary",
            "description": "UTF-8 text file instead of `text`",
        }
    return {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": schema},
                "multipart/form-data": {"schema": {"type": "object", "properties": form_props}},
            },
        }
    }
