"""Routes, generic over the loaded `ModelService`. Thin: parse and validate at the edge, refuse
at once when the queue is full, `preprocess`, hand to the service's engine (which runs the model
off the event loop), `postprocess`. A client that disconnects cancels its work."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
from collections.abc import AsyncIterator, Awaitable
from typing import Any
from urllib.parse import unquote_to_bytes

import numpy as np
from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ValidationError

try:  # python-multipart's import name since 0.0.13; before, `multipart`
    from python_multipart.exceptions import FormParserError
    from python_multipart.multipart import MultipartParser, parse_options_header
except ModuleNotFoundError:  # pragma: no cover
    from multipart.exceptions import FormParserError
    from multipart.multipart import MultipartParser, parse_options_header

from ml_service import __version__
from ml_service.backend.dependencies import DepsDep
from ml_service.backend.errors import (
    INFO_ROUTE_ERRORS,
    MODEL_ROUTE_ERRORS,
    BadRequest,
    ClientDisconnected,
    GenerationTimeout,
    Overloaded,
    ServiceError,
    as_service_error,
    openapi_responses,
    pydantic_errors,
)
from ml_service.backend.security import require_api_key
from ml_service.cache import CachedStream, StoringStream
from ml_service.contract import BatchRequest, InvalidInput, ModelService
from ml_service.observability import ServiceMetrics
from ml_service.settings import Settings

ERRORS = openapi_responses(*MODEL_ROUTE_ERRORS)  # generated from the error classes
log = logging.getLogger("ml_service")
STREAM_DOC = (
    '\n\nWith `"stream": true` the answer is `text/event-stream`: `token` events '
    '(`{"text": piece}`) as text is generated, then one `done` event with the response below '
    '(or an `error` event `{"detail": ...}`).'
)


def build_router(service_cls: type[ModelService]) -> APIRouter:
    """/forward, /forward_batch and /metadata for one service class."""
    router = APIRouter()
    guarded = [Depends(require_api_key)]  # API keys and rate limits, before the body is read
    req_model, batch_model = service_cls.request_model, service_cls.batch_request_model
    array_fields = _array_fields(req_model)
    takes_text = "text" in req_model.model_fields
    streams = "stream" in req_model.model_fields

    @router.post(
        "/forward",
        response_model=service_cls.response_model,
        responses=_with_stream(ERRORS) if streams else ERRORS,
        dependencies=guarded,
        openapi_extra=_forward_body(req_model, takes_text),
        summary=f"{service_cls.name}: one input",
        description=f"{service_cls.description}.\n\nSend JSON, or multipart/form-data with the same "
        "fields as form fields"
        + (" (a UTF-8 text `file` may replace `text`)." if takes_text else ".")
        + (STREAM_DOC if streams else ""),
    )
    async def forward(request: Request, deps: DepsDep):
        payload = await read_body(request, deps.settings, array_fields, takes_text)
        req = validate_model(req_model, payload)
        model = deps.model  # one version for the whole request, even across a reload
        check_room(model.engine, 1)
        item = model.service.preprocess(req)
        deps.host.mirror([req], model)  # a copy for the shadow version, if any (never awaited)
        _note_prompt(request, req)
        opted_in = getattr(req, "cache", True)
        if streams and req.stream:
            # queued now (a full queue is still a plain 503), or the cached answer as a stream
            (events,) = await stream_items(request, deps, model, [item], opted_in)
            return StreamingResponse(
                _sse(
                    request,
                    events,
                    model.service,
                    req,
                    deps.settings.request_timeout_s,
                    deps.metrics,
                ),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        (output,) = await run_items(request, deps, model, [item], opted_in)
        return model.service.postprocess(output, req)

    @router.post(
        "/forward_batch",
        response_model=service_cls.batch_response_model,
        responses=ERRORS,
        dependencies=guarded,
        openapi_extra=_batch_body(service_cls),
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
        batch_req = validate_model(batch_model, await read_json_object(request))
        model = deps.model
        requests = model.service.split_batch(batch_req)
        check_room(model.engine, len(requests))
        items = []
        for i, req in enumerate(requests):
            try:
                items.append(model.service.preprocess(req))
            except InvalidInput as e:
                loc = model.service.batch_item_loc(i, e.loc)
                raise BadRequest([{"loc": [str(x) for x in loc], "msg": str(e)}]) from None
        deps.host.mirror(requests, model)
        opted_in = getattr(batch_req, "cache", True)
        outputs = await run_items(request, deps, model, items, opted_in)
        return model.service.batch_response(
            [model.service.postprocess(o, r) for o, r in zip(outputs, requests, strict=True)]
        )

    @router.get(
        "/metadata",
        responses=openapi_responses(*INFO_ROUTE_ERRORS),
        summary="the loaded model, its limits and the service version",
    )
    async def metadata(deps: DepsDep) -> dict:
        """The service (name, description), the model (id, version, preset, parameters, context,
        vocabulary, dtype, device, training card), the request limits and the service version."""
        model, host = deps.model, deps.host
        return {
            **model.service.metadata(),
            "version": model.version,
            "service_version": __version__,
            # what this replica holds (each loaded version has its own weights in memory)
            "loaded_versions": sorted(host.loaded),
            "traffic": host.split.shares() if host.split else None,
            "shadow_version": host.shadow.version if host.shadow else None,
        }

    return router


async def run_items(request: Request, deps, model, items: list, opted_in: bool = True) -> list:
    """Outputs for preprocessed `items`, in order: those the response cache holds from it, the
    others from the engine (together, one request to it), which are then stored; cancelled if the
    client goes away, 504 past the timeout."""
    plan = await deps.cache.plan(request, model.service, items, opted_in)
    fresh = []
    if todo := plan.missing():
        work = model.engine.submit_many([items[i] for i in todo])
        fresh = await unless_disconnected(request, work, deps.settings.request_timeout_s)
        await deps.cache.store(plan, model.service, fresh)
    outputs = plan.merged(fresh)
    note_usage(request, outputs)
    return outputs


async def stream_items(request: Request, deps, model, items: list, opted_in: bool = True) -> list:
    """One stream per item (the engine's `TokenStream` interface): a cached output as one piece,
    the others queued on the engine now (and stored when they finish)."""
    plan = await deps.cache.plan(request, model.service, items, opted_in)
    streams = []
    for item, key, found in zip(items, plan.keys, plan.found, strict=True):
        if found is not None:
            streams.append(CachedStream(found))
            continue
        stream = model.engine.stream(item)
        if key is not None and plan.write:
            stream = StoringStream(stream, deps.cache, key, model.service)
        streams.append(stream)
    return streams


def check_room(engine, n: int) -> None:
    """503 before any tokenization or model work when the queue cannot take `n` more."""
    if not engine.has_room(n):
        raise Overloaded([{"loc": ["queue"], "msg": "the request queue is full"}])


def _note_prompt(request: Request, req: BaseModel) -> None:
    """For the access log (the prompt itself is written only when ML_SERVICE_LOG_PROMPTS is on)."""
    if isinstance(getattr(req, "text", None), str):
        request.state.prompt = req.text


def note_usage(request: Request, outputs: list) -> None:
    """Token counts for the access log, when the outputs have them (text generation does)."""
    if outputs and all(hasattr(o, "completion_tokens") for o in outputs):
        request.state.prompt_tokens = sum(o.prompt_tokens for o in outputs)
        request.state.completion_tokens = sum(o.completion_tokens for o in outputs)


def _with_stream(responses: dict) -> dict:
    """The 200 answer may also be an event stream (documented for clients and for fuzzers)."""
    return {
        **responses,
        200: {
            "description": "the response (JSON), or with `stream` a `text/event-stream`",
            "content": {"text/event-stream": {"schema": {"type": "string"}}},
        },
    }


async def unless_disconnected(request: Request, work: Awaitable, timeout: float) -> Any:
    """Await `work`, cancelling it (and so its rows in the engine) if the client disconnects
    (499, nobody reads it) or it takes longer than `timeout` seconds (504)."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        done, _ = await asyncio.wait(
            {task, watcher}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
        )
    finally:
        watcher.cancel()
        task.cancel()  # a no-op once it is done; else its rows leave the engine
    if task in done:
        return task.result()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    if watcher in done:
        log.info("client disconnected from %s: its generation was cancelled", request.url.path)
        raise ClientDisconnected()
    raise GenerationTimeout([{"loc": ["timeout"], "msg": f"took longer than {timeout:g} s"}])


async def _sse(
    request: Request,
    events,
    service,
    req: BaseModel,
    timeout: float,
    metrics: ServiceMetrics | None = None,
) -> AsyncIterator[str]:
    """Server-Sent Events for one streamed generation (closing the stream cancels it).

    Its status is 200 before any failure can happen, so a stream counts its own failures in
    `ml_service_request_failures_total` (the access log counts the others from their status)."""
    # one timer for the whole stream (a timeout per event would cost a task per token)
    expiry = asyncio.get_running_loop().call_later(
        timeout, events.interrupt, asyncio.TimeoutError()
    )
    failure = "cancelled"  # unless it ends otherwise: the client went away mid-stream
    try:
        async for event in events:
            if isinstance(event, str):
                yield _event("token", {"text": event})
            else:
                note_usage(request, [event])
                failure = None
                yield _event("done", service.postprocess(event, req).model_dump())
    except Exception as e:  # the same map as JSON answers (a timeout, the model, a shutdown)
        error = as_service_error(e)
        failure = error.reason
        if isinstance(error, GenerationTimeout):
            detail = f"timed out after {timeout:g} s"
        else:
            detail = error.detail
            if type(error) is ServiceError:
                log.exception("stream failed")
        yield _event("error", {"detail": detail})
    finally:
        expiry.cancel()
        events.cancel()  # a no-op when it finished; otherwise its row leaves the batch
        if failure is not None and metrics is not None:
            metrics.failures.labels(reason=failure).inc()


def _event(name: str, data: dict) -> str:
    return f"event: {name}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"


def validate_model(model: type[BaseModel], payload: dict) -> BaseModel:
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


MAX_JSON_DEPTH = 32  # arrays and objects inside each other; our bodies need 3
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')


def json_depth_exceeds(body: bytes, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether `body` nests arrays/objects more than `limit` deep, decided without parsing it (a
    deep parse would recurse once per level). Brackets inside strings do not count."""
    if body.count(b"[") + body.count(b"{") <= limit:  # every ordinary body: no scan at all
        return False
    structure = np.frombuffer(_JSON_STRING.sub(b'""', body), dtype=np.uint8)
    steps = (structure == ord("[")).astype(np.int32) + (structure == ord("{"))
    steps -= (structure == ord("]")).astype(np.int32) + (structure == ord("}"))
    return bool(steps.cumsum().max(initial=0) > limit)


# what Python's JSON parser reports (its whole, fixed set of messages), in our words
JSON_PROBLEMS = {
    "Expecting value": "a value was expected",
    "Expecting ':' delimiter": "a ':' was expected",
    "Expecting ',' delimiter": "a ',' was expected",
    "Expecting property name enclosed in double quotes": "a key in double quotes was expected",
    "Unterminated string starting at": "a string that is never closed starts here",
    "Invalid control character at": "a control character inside a string must be escaped",
    "Invalid \\escape": "a string has an invalid backslash escape",
    "Invalid \\uXXXX escape": "a string has an invalid \\u escape",
    "Extra data": "more text after the JSON value",
}


def parse_json(body: bytes) -> Any:
    """The JSON value of a request body, or BadRequest that says, in our words, what is wrong."""
    if json_depth_exceeds(body):
        raise BadRequest.one("body", f"malformed JSON: nested more than {MAX_JSON_DEPTH} deep")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadRequest.one("body", f"the body is not UTF-8 text (byte {e.start})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        problem = JSON_PROBLEMS.get(e.msg, "invalid JSON syntax")
        raise BadRequest.one(
            "body", f"malformed JSON at line {e.lineno}, column {e.colno}: {problem}"
        ) from None
    except ValueError:  # the only other one: an integer longer than Python converts (4,300 digits)
        raise BadRequest.one("body", "malformed JSON: a number has too many digits") from None


async def read_json_object(request: Request) -> dict:
    payload = parse_json(await request.body())
    if not isinstance(payload, dict):
        raise BadRequest.one("body", "the JSON body must be an object")
    return payload


MAX_FORM_FIELDS = 32  # form fields in one request (files not counted: at most one)


async def read_form(
    request: Request, settings: Settings, array_fields: set[str], takes_text: bool
) -> dict:
    """The fields of a multipart or url-encoded form. Every field, and an uploaded `file`, must be
    UTF-8 text: we parse the body ourselves, keeping each field's bytes, because Starlette's
    parser turns bytes that are not UTF-8 into other characters (latin-1) without a word."""
    body = await request.body()  # bounded by ML_SERVICE_MAX_BODY_BYTES (413 past it)
    if _content_type(request) == "multipart/form-data":
        parts = _multipart_parts(body, request.headers.get("content-type", ""))
    else:
        parts = _urlencoded_parts(body)
    files = [name for name, is_file, _ in parts if is_file]
    if len(files) > 1:
        raise BadRequest.one(files[1], "at most one file may be sent")
    if len(parts) - len(files) > MAX_FORM_FIELDS:
        raise BadRequest.one("body", f"at most {MAX_FORM_FIELDS} form fields may be sent")
    fields: dict[str, list[str]] = {}
    upload: bytes | None = None
    for name, is_file, data in parts:
        if is_file:
            if name != "file" or not takes_text:
                raise BadRequest.one(
                    name,
                    "only the field 'file' may be a file"
                    if takes_text
                    else "files are not accepted",
                )
            upload = data
            continue
        if name == "file" and takes_text:
            raise BadRequest.one("file", "'file' must be an uploaded file")
        try:
            fields.setdefault(name, []).append(data.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise BadRequest.one(
                name, f"{name!r} is not valid UTF-8 text (byte {e.start} of its value)"
            ) from None
    payload: dict[str, Any] = {
        name: values if name in array_fields else values[-1] for name, values in fields.items()
    }
    if upload is not None:
        if "text" in payload:
            raise BadRequest.one("file", "send either 'text' or 'file', not both")
        if len(upload) > settings.max_file_bytes:
            raise BadRequest.one("file", f"file is larger than {settings.max_file_bytes} bytes")
        try:
            payload["text"] = upload.decode("utf-8")
        except UnicodeDecodeError:
            raise BadRequest.one("file", "file is not valid UTF-8 text") from None
    return payload


def _field_name(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest.one("body", "a form field's name is not valid UTF-8 text") from None


def _urlencoded_parts(body: bytes) -> list[tuple[str, bool, bytes]]:
    """(name, is a file, value bytes) for each field of an url-encoded form, %-escapes and `+`
    decoded to bytes (not yet to text)."""
    parts = []
    for pair in body.split(b"&"):
        if not pair:
            continue
        if len(parts) > MAX_FORM_FIELDS:  # the count is refused by the caller
            break
        name, _, value = pair.partition(b"=")
        name, value = (unquote_to_bytes(x.replace(b"+", b" ")) for x in (name, value))
        parts.append((_field_name(name), False, value))
    return parts


def _multipart_parts(body: bytes, content_type: str) -> list[tuple[str, bool, bytes]]:
    """(name, is a file, bytes) for each part of a multipart/form-data body, or BadRequest that
    says in our words what is wrong with it."""
    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary:
        raise BadRequest.one("content-type", "multipart/form-data needs a boundary parameter")
    parts: list[tuple[str, bool, bytes]] = []
    state: dict[str, Any] = {"ended": False}
    header = [bytearray(), bytearray()]  # the part header being read: name, value

    def part_begin() -> None:
        if len(parts) > MAX_FORM_FIELDS + 1:  # more than any request may send: stop reading
            raise BadRequest.one("body", f"at most {MAX_FORM_FIELDS} form fields may be sent")
        state.update(disposition=None, data=bytearray())

    def header_field(data: bytes, start: int, end: int) -> None:
        header[0] += data[start:end]

    def header_value(data: bytes, start: int, end: int) -> None:
        header[1] += data[start:end]

    def header_end() -> None:
        if bytes(header[0]).strip().lower() == b"content-disposition":
            state["disposition"] = bytes(header[1])
        header[0], header[1] = bytearray(), bytearray()

    def part_data(data: bytes, start: int, end: int) -> None:
        state["data"] += data[start:end]

    def part_end() -> None:
        _, options = parse_options_header(state["disposition"] or b"")
        if b"name" not in options:
            raise BadRequest.one("body", "a part of the multipart body has no field name")
        parts.append((_field_name(options[b"name"]), b"filename" in options, bytes(state["data"])))

    def end() -> None:
        state["ended"] = True

    callbacks = {
        "on_part_begin": part_begin,
        "on_header_field": header_field,
        "on_header_value": header_value,
        "on_header_end": header_end,
        "on_part_data": part_data,
        "on_part_end": part_end,
        "on_end": end,
    }
    try:
        parser = MultipartParser(boundary, callbacks)
        parser.write(body)
        parser.finalize()
    except FormParserError:
        raise BadRequest.one("body", "malformed multipart body") from None
    if not state["ended"]:
        raise BadRequest.one("body", "malformed multipart body: it ends before its last boundary")
    return parts


def _array_fields(model: type[BaseModel]) -> set[str]:
    """Fields that take a list: a repeated form field fills them."""
    props = model.model_json_schema().get("properties", {})
    return {
        name
        for name, p in props.items()
        if p.get("type") == "array" or any(a.get("type") == "array" for a in p.get("anyOf", []))
    }


def _inline_refs(schema: dict) -> dict:
    """The model's JSON schema with its `$defs` written in place: a schema put into the OpenAPI
    document by hand cannot point at `#/$defs/...` (ReDoc and schemathesis resolve references from
    the document's root). The request models are not recursive."""
    defs = schema.pop("$defs", {})

    def resolve(node):
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            if ref.startswith("#/$defs/"):
                return resolve(
                    {
                        **defs[ref.removeprefix("#/$defs/")],
                        **{k: v for k, v in node.items() if k != "$ref"},
                    }
                )
            return {k: resolve(v) for k, v in node.items()}
        if isinstance(node, list):
            return [resolve(v) for v in node]
        return node

    return resolve(schema)


def _json_body(model: type[BaseModel]) -> dict:
    """The OpenAPI request body of a route that reads its JSON itself."""
    schema = _inline_refs(model.model_json_schema())
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def _batch_body(service_cls: type[ModelService]) -> dict:
    """The /forward_batch body. The default one (`BatchRequest`) takes its items as plain objects
    and validates each as a single request, so that an error names its item (`["items", 3,
    "text"]`); the document describes each item as that request."""
    body = _json_body(service_cls.batch_request_model)
    if service_cls.batch_request_model is BatchRequest:
        schema = body["requestBody"]["content"]["application/json"]["schema"]
        item = _inline_refs(service_cls.request_model.model_json_schema())
        schema["properties"]["items"]["items"] = item
    return body


def _forward_body(model: type[BaseModel], takes_text: bool) -> dict:
    schema = _inline_refs(model.model_json_schema())
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
