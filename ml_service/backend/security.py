"""Protection at the edge, before any parsing or model work: API keys, the admin token, rate limits
and the request body size."""

from __future__ import annotations

import hmac
import math
import time
from typing import Annotated

from fastapi import Depends, Request
from limits import parse_many
from limits.storage import MemoryStorage
from limits.strategies import MovingWindowRateLimiter

from ml_service.backend.errors import ServiceError
from ml_service.settings import Settings


class Unauthorized(ServiceError):
    status_code = 401
    detail = "unauthorized"

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": "Bearer"}


class RateLimited(ServiceError):
    status_code = 429
    detail = "rate limit exceeded"

    def __init__(self, retry_after_s: int, limit: str):
        super().__init__([{"loc": ["rate_limit"], "msg": f"more than {limit}"}])
        self.retry_after_s = retry_after_s

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s)}


class BodyTooLarge(ServiceError):
    status_code = 413
    detail = "request body too large"


def bearer_token(request: Request) -> str | None:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _matches(token: str | None, secrets) -> bool:
    # compare with every key in constant time, so timing does not reveal a key's prefix
    return token is not None and any(
        hmac.compare_digest(token.encode(), s.get_secret_value().encode()) for s in secrets
    )


class Guard:
    """API keys and per-client rate limits for the generation routes."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.limits = parse_many(settings.rate_limit) if settings.rate_limit else []
        self.limiter = MovingWindowRateLimiter(MemoryStorage())

    def check(self, request: Request) -> None:
        token = bearer_token(request)
        if self.settings.api_keys:
            if token is None:
                raise Unauthorized([{"loc": ["authorization"], "msg": "missing bearer API key"}])
            if not _matches(token, self.settings.api_keys):
                raise Unauthorized([{"loc": ["authorization"], "msg": "invalid API key"}])
            client = "key:" + hmac.new(b"rate", token.encode(), "sha256").hexdigest()[:16]
        else:
            client = "addr:" + (request.client.host if request.client else "unknown")
        for limit in self.limits:
            if not self.limiter.hit(limit, client):
                reset_at = self.limiter.get_window_stats(limit, client).reset_time
                raise RateLimited(max(1, math.ceil(reset_at - time.time())), str(limit))

    def check_admin(self, request: Request) -> None:
        if self.settings.admin_token is None:
            raise Unauthorized(
                [
                    {
                        "loc": ["authorization"],
                        "msg": "admin endpoints are disabled: set ML_SERVICE_ADMIN_TOKEN",
                    }
                ]
            )
        if not _matches(bearer_token(request), [self.settings.admin_token]):
            raise Unauthorized([{"loc": ["authorization"], "msg": "invalid admin token"}])


async def _guard(request: Request) -> Guard:
    return request.app.state.guard


async def require_api_key(request: Request, guard: Annotated[Guard, Depends(_guard)]) -> None:
    guard.check(request)


async def require_admin(request: Request, guard: Annotated[Guard, Depends(_guard)]) -> None:
    guard.check_admin(request)


class BodyLimit:
    """ASGI middleware: 413 for a body over `max_bytes`, by its Content-Length before reading it,
    or while reading a body sent without one."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await self._refuse(send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise BodyTooLarge(self._errors())
            return message

        await self.app(scope, counted, send)

    def _errors(self) -> list[dict]:
        return [{"loc": ["body"], "msg": f"the body is larger than {self.max_bytes} bytes"}]

    async def _refuse(self, send) -> None:
        await BodyTooLarge(self._errors()).response()({"type": "http"}, None, send)
