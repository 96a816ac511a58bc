"""The error contract, in one place: every status the service answers, its body and its metrics
reason. Each error class carries its status; `as_service_error` maps every exception the routes,
services and engines raise to one of them (as TGI's router maps its error enum in one `match`).

Any bad request -> 400 {"detail": "bad request", "errors": [{"loc": [...], "msg": ...}]}; a failure
inside the model on valid input -> 403 {"detail": "модель не смогла обработать данные"}; a full
queue, a shutdown, or a model not loaded -> 503 with `Retry-After`; anything unexpected -> 500 with
no traceback (the log has it). FastAPI's 422 never reaches a client.

The routes' OpenAPI `responses` and the app's description are generated from these classes
(`openapi_responses`, `describe_errors`, and the groups `MODEL_ROUTE_ERRORS` etc.), so the docs
list what the code answers.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from lib.inference import (
    EngineDied,
    EngineRestarting,
    EngineStopped,
    GenerationFailed,
    PromptTooLong,
    QueueFull,
)
from lib.inference.adapters import AdapterError, AdapterNotFound
from ml_service.backend.openai_protocol import OpenAIErrorResponse
from ml_service.backend.schemas import ErrorResponse
from ml_service.contract import InvalidInput
from ml_service.hosting import VersionError, VersionNotLoaded
from ml_service.shutdown import SHUTTING_DOWN
from ml_service.traffic import BadSplit
from ml_service.validation import pydantic_errors

log = logging.getLogger("ml_service")
OPENAI_PREFIX = "/v1/"
MODEL_FAILED = "модель не смогла обработать данные"


class ServiceError(Exception):
    """An answer of the service: status, body (`detail`, `errors`), headers, metrics reason, and
    its OpenAI form for the /v1 routes (`{"error": {"message", "type", "param", "code"}}`)."""

    status_code = 500
    detail = "internal server error"
    when = "a bug in the service (the answer has no details, the log has them)"  # for the docs
    reason: str | None = "internal"  # the `reason` label of ml_service_request_failures_total
    openai_type = "server_error"
    openai_code: str | None = None
    openai_status: int | None = None  # where /v1 answers another status (the ecosystem's)

    def __init__(self, errors: list[dict] | None = None):
        super().__init__(self.detail)
        self.errors = errors or []

    def headers(self) -> dict[str, str]:
        return {}

    def response(self, path: str = "") -> JSONResponse:
        """Our body, or OpenAI's on the /v1 routes."""
        if path.startswith(OPENAI_PREFIX):
            status = self.openai_status or self.status_code
            return JSONResponse(self.openai_body(), status_code=status, headers=self.headers())
        return JSONResponse(self.body(), status_code=self.status_code, headers=self.headers())

    async def send(self, scope, receive, send) -> None:
        """Answer from an ASGI middleware (before any route), noting the metrics reason as the
        exception handlers do."""
        scope.setdefault("state", {})["failure_reason"] = self.reason
        await self.response(scope.get("path", ""))(scope, receive, send)

    def openai_body(self) -> dict:
        """The first error names the offending field (`param`, dotted: `messages.0.content`)."""
        first = self.errors[0] if self.errors else None
        param = ".".join(str(x) for x in first.get("loc", [])) if first else ""
        # (a detail that says it all once: ShuttingDown's, whose error says the same words)
        said = first is None or first["msg"] == self.detail
        message = self.detail if said else f"{self.detail}: {first['msg']}"
        return {
            "error": {
                "message": message,
                "type": self.openai_type,
                "param": param or None,
                "code": self.openai_code,
            }
        }

    def body(self) -> dict:
        return (
            {"detail": self.detail, "errors": self.errors}
            if self.errors
            else {"detail": self.detail}
        )


class BadRequest(ServiceError):
    status_code = 400
    detail = "bad request"
    when = "bad request: `errors` says what is wrong and where (on /v1: `param`)"
    reason = "bad_request"
    openai_type = "invalid_request_error"

    @classmethod
    def one(cls, loc: str, msg: str) -> BadRequest:
        return cls([{"loc": [loc], "msg": msg}])


class Unauthorized(ServiceError):
    status_code = 401
    detail = "unauthorized"
    when = "missing or wrong API key or admin token (with `WWW-Authenticate: Bearer`)"
    reason = "unauthorized"
    openai_type = "authentication_error"
    openai_code = "invalid_api_key"

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": "Bearer"}


class ModelFailed(ServiceError):
    status_code = 403  # the seed contract's; /v1 follows the ecosystem: a 500 server_error
    detail = MODEL_FAILED
    when = "the model failed on valid input (on /v1: 500)"
    reason = "model_error"
    openai_status = 500
    openai_code = "model_error"

    def openai_body(self) -> dict:
        body = super().openai_body()
        body["error"]["message"] = "the model failed while processing the request"
        return body


class ModelNotFound(ServiceError):
    """/v1: a `model` that is not served here (the ids are in /v1/models)."""

    status_code = 404
    detail = "model not found"
    when = "`X-Model-Version` (on /v1: `model`) names a version not loaded here"
    reason = "bad_request"
    openai_type = "invalid_request_error"
    openai_code = "model_not_found"


class AdapterNotLoaded(ModelNotFound):
    """A LoRA adapter that is not loaded here: a request's (/forward's `adapter`, the OpenAI
    `model` `<model>:<adapter>`; also one removed while the request waited), or DELETE's."""

    when = "the `adapter` (on /v1: the `model` `<model>:<adapter>`) is not loaded here"

    def openai_body(self) -> dict:
        body = super().openai_body()
        body["error"]["param"] = "model"  # what names an adapter on /v1
        return body


class BodyTooLarge(ServiceError):
    status_code = 413
    detail = "request body too large"
    when = "the body is larger than ML_SERVICE_MAX_BODY_BYTES"
    reason = "bad_request"
    openai_type = "invalid_request_error"


class RateLimited(ServiceError):
    status_code = 429
    detail = "rate limit exceeded"
    when = "rate limited, or too many failed authentications from this address (`Retry-After`)"
    reason = "rate_limited"
    openai_type = "rate_limit_error"
    openai_code = "rate_limit_exceeded"

    def __init__(self, retry_after_s: int, limit: str, loc: str = "rate_limit"):
        super().__init__([{"loc": [loc], "msg": f"more than {limit}"}])
        self.retry_after_s = retry_after_s

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s)}


class HeadersTooLarge(ServiceError):
    status_code = 431
    detail = "request header fields too large"
    when = "the header fields total more than ML_SERVICE_MAX_HEADER_BYTES"
    reason = "bad_request"
    openai_type = "invalid_request_error"


class ClientDisconnected(ServiceError):
    """The client went away before its answer was ready (its work was cancelled); nobody reads
    this response (nginx's code for it)."""

    status_code = 499
    detail = "client closed request"
    when = "the client went away (nobody reads this answer)"
    reason = "cancelled"


class Overloaded(ServiceError):
    """The engine's queue is full: try again shortly."""

    status_code = 503
    detail = "the service is at capacity; retry later"
    when = "the queue is full (`Retry-After`)"
    reason = "queue_full"
    retry_after_s = 1

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s)}


class ShuttingDown(Overloaded):
    """The engine stopped (a shutdown): another replica, or this one restarted, will answer."""

    detail = SHUTTING_DOWN
    when = "the service is shutting down (`Retry-After`)"
    reason = "shutdown"


class EngineUnavailable(Overloaded):
    """The engine's process died (its requests could not finish) and a new one is loading."""

    detail = "the generation engine restarted after a crash; retry the request"
    when = "the engine's process is restarting after a crash (`Retry-After`)"
    reason = "engine_restarting"
    retry_after_s = 5


class ModelNotReady(ServiceError):
    """503 while there is no model to serve: still loading (`Retry-After`), or its load failed
    (until an admin reload succeeds). No path or exception text: the server log has those."""

    status_code = 503
    detail = "model is not loaded yet"
    when = "the model is still loading (`Retry-After`) or failed to load"
    reason = "not_ready"

    def __init__(self, failed: bool = False):
        self.failed = failed
        if failed:
            self.detail = "the model failed to load"
            msg = "the model could not be loaded; the server log has the details"
        else:
            msg = "the model is still loading; retry shortly"
        super().__init__([{"loc": ["model"], "msg": msg}])

    def headers(self) -> dict[str, str]:
        return {} if self.failed else {"Retry-After": "5"}


class GenerationTimeout(ServiceError):
    """The generation ran past ML_SERVICE_REQUEST_TIMEOUT_S: it was cancelled, freeing the model."""

    status_code = 504
    detail = "generation timed out"
    when = "the generation ran past ML_SERVICE_REQUEST_TIMEOUT_S (it was cancelled)"
    reason = "timeout"
    openai_type = "timeout"


class Unready(ServiceError):
    """/ready before the model serves: the probe's own body (ops.py's `ReadyResponse`: `status`,
    `error`, ...), not an error body. A probe's answer, not a failed request (no reason)."""

    status_code = 503
    detail = "not ready"
    when = "loading, the load failed, or the engine is restarting"
    reason = None

    def __init__(self, body: dict):
        super().__init__()
        self._body = body

    def body(self) -> dict:
        return self._body


class HTTPError(ServiceError):
    """Starlette's own answers (404 unknown path, 405 wrong method), in our body shape. A wrong
    path or method is not a failed request (no metrics reason); anything else Starlette raises
    is a bad request."""

    reason = "bad_request"
    openai_type = "invalid_request_error"

    def __init__(self, status_code: int, detail: str, headers: dict[str, str] | None = None):
        self.status_code, self.detail, self._headers = status_code, detail, headers or {}
        if status_code in (404, 405):
            self.reason = None
        super().__init__()

    def headers(self) -> dict[str, str]:
        return self._headers


EXPECTED = (
    ServiceError,
    ValidationError,
    RequestValidationError,
    InvalidInput,
    PromptTooLong,
    EngineStopped,
    EngineDied,
    QueueFull,
    GenerationFailed,
    TimeoutError,
    StarletteHTTPException,
    VersionError,
    BadSplit,
    AdapterError,
    AdapterNotFound,
)


def as_service_error(exc: BaseException) -> ServiceError:
    """The answer to any exception: the whole mapping from what `lib`, the services and the
    engines raise to statuses."""
    match exc:
        case ServiceError():
            return exc
        case ValidationError() | RequestValidationError():
            return BadRequest(pydantic_errors(exc))
        case InvalidInput():
            return BadRequest(exc.errors)
        case VersionNotLoaded():  # a request pinned a version this replica does not hold
            return ModelNotFound([{"loc": [exc.loc], "msg": str(exc)}])
        case VersionError():  # an admin route: unknown version, or it failed to load
            return BadRequest([{"loc": [exc.loc], "msg": str(exc)}])
        case AdapterNotFound():  # not loaded, or removed before the request ran
            return AdapterNotLoaded([{"loc": ["adapter"], "msg": str(exc)}])
        case AdapterError():  # POST /admin/adapters: what is wrong with it
            return BadRequest([{"loc": ["path"], "msg": str(exc)}])
        case BadSplit():  # POST /admin/traffic
            return BadRequest.one("split", f"{exc}; the split in force stays")
        case PromptTooLong():
            return BadRequest([{"loc": ["text"], "msg": str(exc)}])
        case EngineDied() | EngineRestarting():
            return EngineUnavailable([{"loc": ["engine"], "msg": str(exc)}])
        case EngineStopped():
            return ShuttingDown([{"loc": ["queue"], "msg": str(exc)}])
        case QueueFull():
            return Overloaded([{"loc": ["queue"], "msg": str(exc)}])
        case GenerationFailed():  # an engine's model raised on valid input (any engine)
            return ModelFailed()
        case TimeoutError():
            return GenerationTimeout()
        case StarletteHTTPException():
            return HTTPError(exc.status_code, exc.detail, exc.headers)
        case _:
            return ServiceError()


# What each kind of route can answer, for its OpenAPI `responses` (checked against the classes
# by tests/ml_service/backend/test_errors.py): the edge's limits come before any route
# (security.py's middlewares), the guard's on the routes that need a key or the admin token.
EDGE_ERRORS = (BodyTooLarge, HeadersTooLarge, ServiceError)
GUARD_ERRORS = (Unauthorized, RateLimited)
MODEL_ROUTE_ERRORS = (
    BadRequest,
    ModelNotFound,
    AdapterNotLoaded,
    ModelFailed,
    Overloaded,
    ShuttingDown,
    EngineUnavailable,
    ModelNotReady,
    GenerationTimeout,
    *GUARD_ERRORS,
    *EDGE_ERRORS,
)
INFO_ROUTE_ERRORS = (ModelNotFound, ModelNotReady, *GUARD_ERRORS, *EDGE_ERRORS)  # /metadata
ADMIN_ROUTE_ERRORS = (BadRequest, *GUARD_ERRORS, *EDGE_ERRORS)
ADAPTER_ROUTE_ERRORS = (*ADMIN_ROUTE_ERRORS, AdapterNotLoaded)  # /admin/adapters


def openapi_responses(
    *errors: type[ServiceError], openai: bool = False, model: type | None = None
) -> dict[int | str, dict[str, Any]]:
    """The OpenAPI `responses` of a route that can answer with `errors`: one entry per status,
    described by its classes' `when`, with our error body (OpenAI's and its statuses on /v1, or
    `model`)."""
    model = model or (OpenAIErrorResponse if openai else ErrorResponse)
    found: dict[int, list[str]] = {}
    for error in errors:
        status = (error.openai_status or error.status_code) if openai else error.status_code
        found.setdefault(status, []).append(error.when)
    return {
        status: {"model": model, "description": "; ".join(whens)}
        for status, whens in sorted(found.items())
    }


def describe_errors(*errors: type[ServiceError]) -> str:
    """A Markdown list for the app's description: each status and when it is answered."""
    responses = openapi_responses(*errors)
    return "\n".join(f"- {status}: {r['description']}" for status, r in responses.items())


class KeepConnection:
    """The outermost layer, around Starlette's server-error middleware. That middleware answers
    an exception nothing else handled (a JSON 500, by `last_answer`) and then raises it again
    for the server to log, and uvicorn, seeing an exception, closes the connection: a pooled
    client's next requests on it fail (`ReadError`). Here such an exception is logged (with its
    traceback, when it is a bug) and ends: the answer is complete and the connection stays. So
    no exception reaches the server, whatever raised it (a route, a validator, a middleware). An
    exception after an answer started cannot be answered: that answer stays truncated, and the
    server closes its connection."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":  # the lifespan's failures are the server's to report
            return await self.app(scope, receive, send)
        started = False

        async def sending(message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, sending)
        except Exception as exc:
            if type(as_service_error(exc)) is ServiceError:  # not one we expected: a bug
                log.exception("unhandled error on %s %s", scope["method"], scope["path"])
            if not started:  # (the server-error middleware answers; in case it could not)
                scope.setdefault("state", {})["failure_reason"] = ServiceError.reason
                await ServiceError().response(scope["path"])(scope, receive, send)


def install_error_handlers(app: FastAPI) -> None:
    async def answer(request: Request, exc: Exception):
        error = as_service_error(exc)
        if type(error) is ServiceError:  # not one we expected: a bug
            log.exception("unhandled error on %s %s", request.method, request.url.path)
        request.state.failure_reason = error.reason
        return error.response(request.url.path)

    async def last_answer(request: Request, exc: Exception):
        """The server-error middleware's: the same answer; `KeepConnection` logs the bug."""
        error = as_service_error(exc)
        request.state.failure_reason = error.reason
        return error.response(request.url.path)

    # the expected ones are answered by Starlette's exception middleware (FastAPI's own handlers
    # for HTTPException and RequestValidationError are replaced); anything else (a bug, or an
    # exception raised in a middleware) reaches the server-error middleware, which answers 500
    # and raises it again: `KeepConnection`, around it, ends it there
    for exc_class in EXPECTED:
        app.add_exception_handler(exc_class, answer)
    app.add_exception_handler(Exception, last_answer)
    build = app.build_middleware_stack  # called once, at the app's first request or lifespan
    app.build_middleware_stack = lambda: KeepConnection(build())
