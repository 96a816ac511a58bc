"""The seed routes, generic over the loaded `ModelService`: /forward, /forward_batch, /metadata.
Thin: read and validate the body at the edge (`bodies.py`), refuse at once when the queue is full,
`preprocess` (in the preparing thread, off the event loop: `execution.off_loop`), run it
(`execution.py`: the engine, off the event loop; cancelled when the client disconnects),
`postprocess`."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel

from ml_service import __version__
from ml_service.backend.bodies import (
    content_type,
    form_kinds,
    read_body,
    read_json_object,
    validated,
)
from ml_service.backend.dependencies import DepsDep
from ml_service.backend.errors import (
    INFO_ROUTE_ERRORS,
    MODEL_ROUTE_ERRORS,
    BadRequest,
    GenerationTimeout,
    ServiceError,
    openapi_responses,
)
from ml_service.backend.execution import (
    StreamFormat,
    check_room,
    off_loop,
    run_items,
    sse,
    stream_items,
    stream_response,
)
from ml_service.backend.openapi import batch_body, forward_body, with_stream
from ml_service.backend.security import require_api_key
from ml_service.contract import InvalidInput, ModelService

ERRORS = openapi_responses(*MODEL_ROUTE_ERRORS)  # generated from the error classes
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
    kinds = form_kinds(req_model)  # how a form carries each field
    takes_text = "text" in req_model.model_fields
    can_stream = "stream" in req_model.model_fields

    @router.post(
        "/forward",
        response_model=service_cls.response_model,
        responses=with_stream(ERRORS) if can_stream else ERRORS,
        dependencies=guarded,
        openapi_extra=forward_body(req_model, takes_text),
        summary=f"{service_cls.name}: one input",
        description=f"{service_cls.description}.\n\nSend JSON, or multipart/form-data with the same "
        "fields as form fields (read strictly from their text: an integer as decimal digits, a "
        "number as JSON writes one, a boolean as `true` or `false`)"
        + (" (a UTF-8 text `file` may replace `text`)." if takes_text else ".")
        + (STREAM_DOC if can_stream else ""),
    )
    async def forward(request: Request, deps: DepsDep):
        payload = await read_body(request, deps.settings, kinds, takes_text)
        req = validated(req_model, payload)
        model = deps.model  # one version for the whole request, even across a reload
        check_room(model.engine, 1)
        item = await off_loop(model.service.preprocess, req)
        # a copy for the shadow version, if any (never awaited)
        deps.host.mirror([req], model, off_loop)
        _note_prompt(request, req)
        _note_adapter(request, req)
        opted_in = getattr(req, "cache", True)
        if can_stream and req.stream:
            # queued now (a full queue is still a plain 503), or the cached answer as a stream
            streams = await stream_items(request, deps, model, [item], opted_in)
            events = ForwardEvents(model.service, req, deps.settings.request_timeout_s)
            return stream_response(request, deps, streams, events)
        (output,) = await run_items(request, deps, model, [item], opted_in)
        return model.service.postprocess(output, req)

    @router.post(
        "/forward_batch",
        response_model=service_cls.batch_response_model,
        responses=ERRORS,
        dependencies=guarded,
        openapi_extra=batch_body(service_cls),
        summary=f"{service_cls.name}: several inputs",
        description="One result per input, in order (JSON only). The inputs share model batches; "
        "the batch size limit is in /metadata.",
    )
    async def forward_batch(request: Request, deps: DepsDep):
        if (ct := content_type(request)) != "application/json":
            raise BadRequest.one(
                "content-type",
                f"unsupported content type {ct or '(none)'!r}; "
                "/forward_batch takes application/json",
            )
        batch_req = validated(batch_model, await read_json_object(request))
        model = deps.model
        requests = model.service.split_batch(batch_req)
        check_room(model.engine, len(requests))
        items = await off_loop(_preprocess_batch, model.service, requests)
        deps.host.mirror(requests, model, off_loop)
        _note_adapter(request, batch_req)
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


class ForwardEvents(StreamFormat):
    """/forward's stream: a `token` event per piece, then `done` with the response (or `error`
    with what a JSON answer's `detail` would be; a timeout says how long it ran)."""

    def __init__(self, service: ModelService, req: BaseModel, timeout: float):
        self.service, self.req, self.timeout = service, req, timeout

    def piece(self, i: int, text: str) -> list[str]:
        return [sse({"text": text}, event="token")]

    def result(self, i: int, result) -> list[str]:
        return [sse(self.service.postprocess(result, self.req).model_dump(), event="done")]

    def failed(self, error: ServiceError) -> list[str]:
        if isinstance(error, GenerationTimeout):
            detail = f"timed out after {self.timeout:g} s"
        else:
            detail = error.detail
        return [sse({"detail": detail}, event="error")]


def _preprocess_batch(service: ModelService, requests: list[BaseModel]) -> list:
    """Each request preprocessed, in order; the first bad one is a 400 at its place in the
    batch."""
    items = []
    for i, req in enumerate(requests):
        try:
            items.append(service.preprocess(req))
        except InvalidInput as e:
            loc = service.batch_item_loc(i, e.loc)
            raise BadRequest([{"loc": [str(x) for x in loc], "msg": str(e)}]) from None
    return items


def _note_prompt(request: Request, req: BaseModel) -> None:
    """For the access log (the prompt itself is written only when ML_SERVICE_LOG_PROMPTS is on)."""
    if isinstance(getattr(req, "text", None), str):
        request.state.prompt = req.text


def _note_adapter(request: Request, req: BaseModel) -> None:
    """The LoRA adapter a request uses (checked: it is loaded), for the access log and metrics."""
    if isinstance(adapter := getattr(req, "adapter", None), str):
        request.state.adapter = adapter
