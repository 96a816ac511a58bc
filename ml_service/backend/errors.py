"""The error contract, in one place.

Any bad request -> 400 {"detail": "bad request", "errors": [...]}; a failure inside the model on
valid input (`predict` raised) -> 403 {"detail": "модель не смогла обработать данные"}; a full queue
or a stopping engine -> 503 with `Retry-After`; anything unexpected -> 500 with no traceback (the
log has it). FastAPI's 422 never reaches a client.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from lib.inference import EngineStopped, GenerationFailed, PromptTooLong, QueueFull
from ml_service.batching import PredictionFailed
from ml_service.contract import InvalidInput

log = logging.getLogger("ml_service")
MODEL_FAILED = "модель не смогла обработать данные"


class ServiceError(Exception):
    status_code = 500
    detail = "internal server error"

    def __init__(self, errors: list[dict] | None = None):
        super().__init__(self.detail)
        self.errors = errors or []

    def headers(self) -> dict[str, str]:
        return {}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status_code, headers=self.headers())

    def body(self) -> dict:
        return (
            {"detail": self.detail, "errors": self.errors}
            if self.errors
            else {"detail": self.detail}
        )


class BadRequest(ServiceError):
    status_code = 400
    detail = "bad request"

    @classmethod
    def one(cls, loc: str, msg: str) -> BadRequest:
        return cls([{"loc": [loc], "msg": msg}])


class ModelFailed(ServiceError):
    status_code = 403
    detail = MODEL_FAILED


class ClientDisconnected(ServiceError):
    """The client went away before its answer was ready (its work was cancelled); nobody reads
    this response (nginx's code for it)."""

    status_code = 499
    detail = "client closed request"


class GenerationTimeout(ServiceError):
    """The generation ran past ML_SERVICE_REQUEST_TIMEOUT_S: it was cancelled, freeing the model."""

    status_code = 504
    detail = "generation timed out"


class Overloaded(ServiceError):
    """The engine's queue is full (or it is shutting down): try again shortly."""

    status_code = 503
    detail = "the service is at capacity; retry later"
    retry_after_s = 1

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s)}


def pydantic_errors(exc: ValidationError | RequestValidationError) -> list[dict]:
    """Readable, JSON-safe errors: where and what, without echoing large inputs back."""
    out = []
    for e in exc.errors():
        loc = [str(x) for x in e.get("loc", ()) if x != "body"]
        out.append(
            {"loc": loc, "msg": e.get("msg", "invalid value"), "type": e.get("type", "value_error")}
        )
    return out


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def _service_error(_: Request, exc: ServiceError):
        return exc.response()

    async def _overloaded(_: Request, exc: Exception):
        return Overloaded([{"loc": ["queue"], "msg": str(exc)}]).response()

    app.add_exception_handler(QueueFull, _overloaded)
    app.add_exception_handler(EngineStopped, _overloaded)

    @app.exception_handler(RequestValidationError)
    async def _request_validation(_: Request, exc: RequestValidationError):
        return JSONResponse(BadRequest(pydantic_errors(exc)).body(), status_code=400)

    @app.exception_handler(ValidationError)
    async def _validation(_: Request, exc: ValidationError):
        return JSONResponse(BadRequest(pydantic_errors(exc)).body(), status_code=400)

    @app.exception_handler(PromptTooLong)
    async def _too_long(_: Request, exc: PromptTooLong):
        return JSONResponse(BadRequest.one("text", str(exc)).body(), status_code=400)

    @app.exception_handler(InvalidInput)
    async def _invalid_input(_: Request, exc: InvalidInput):
        return JSONResponse(BadRequest.one(exc.loc, str(exc)).body(), status_code=400)

    async def _model_failed(_: Request, exc: Exception):
        return JSONResponse(ModelFailed().body(), status_code=403)

    app.add_exception_handler(GenerationFailed, _model_failed)
    app.add_exception_handler(PredictionFailed, _model_failed)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException):
        return JSONResponse(
            {"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse({"detail": "internal server error"}, status_code=500)
