"""Protection at the edge, before any parsing or model work: API keys, the admin token, rate limits,
a limit on failed authentications per client address, the request body and header sizes, and
(optionally) keys on the routes that describe the service."""

from __future__ import annotations

import asyncio
import hmac
import logging
import math
import os
import time
from typing import Annotated

from fastapi import Depends, Request
from limits import parse_many
from limits.storage import MemoryStorage
from limits.strategies import MovingWindowRateLimiter

from ml_service.backend.errors import (
    BodyTooLarge,
    HeadersTooLarge,
    RateLimited,
    ServiceError,
    Unauthorized,
)
from ml_service.settings import Settings
from ml_service.shared import SharedStore

log = logging.getLogger("ml_service")
# the HMAC key of the counters' names when a fleet shares Redis without ML_SERVICE_REDIS_SECRET:
# every replica must name a client alike, so it is fixed, and public (a warning at start says so)
UNSET_SECRET = b"ml_service: ML_SERVICE_REDIS_SECRET is unset"

# Routes that describe the service (the model, its metrics, the API schema and docs): open by
# default; with ML_SERVICE_GUARD_INFO_ROUTES and API keys they need a key too.
INFO_ROUTES = frozenset({"/metadata", "/metrics", "/docs", "/docs/oauth2-redirect", "/redoc"})


def bearer_token(request: Request) -> str | None:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _matches(token: str | None, secrets) -> bool:
    # compare with every key in constant time, so timing does not reveal a key's prefix
    return token is not None and any(
        hmac.compare_digest(token.encode(), s.get_secret_value().encode()) for s in secrets
    )


class Guard:
    """API keys and per-client rate limits for the generation routes, the admin token, and a
    limit on failed authentications per client address (a brute-force guard).

    The counters live in the fleet's Redis when there is one (`limits`' moving window through
    redis-py: a client's requests count on every replica), else in this replica's memory. Any
    Redis failure or timeout falls back to the memory counters for that hit (the client is then
    limited per replica), is counted as a `rate_limit` fallback, and never fails the request."""

    def __init__(self, settings: Settings, shared: SharedStore | None = None):
        self.settings = settings
        self.shared = shared
        self.limits = parse_many(settings.rate_limit) if settings.rate_limit else []
        self.failure_limits = (
            parse_many(settings.auth_failure_limit) if settings.auth_failure_limit else []
        )
        self.secret = _counter_secret(settings)
        self.limiter = MovingWindowRateLimiter(MemoryStorage())
        self.fleet_limiter = None
        if shared is not None and shared.enabled and (self.limits or self.failure_limits):
            from limits.aio.storage import RedisStorage
            from limits.aio.strategies import MovingWindowRateLimiter as FleetLimiter

            # the shared store's redis-py pool: the same short timeouts, any URL redis-py takes
            # (redis://, rediss://, unix://), one set of connections, closed with the store
            storage = RedisStorage(
                "async+redis://",
                implementation="redispy",
                key_prefix="ml_service:limits",
                connection_pool=shared.pool,
            )
            self.fleet_limiter = FleetLimiter(storage)

    async def check(self, request: Request) -> None:
        """The generation routes: a valid API key (when keys are set), then the rate limit."""
        token = await self.authenticate(request)
        client = (
            self._name("key", token) if token is not None else self._name("addr", _address(request))
        )
        for limit in self.limits:
            allowed, limiter = await self._count(limit, client, "hit")
            if not allowed:
                raise RateLimited(await self._retry_after(limiter, limit, client), str(limit))

    async def authenticate(self, request: Request) -> str | None:
        """The request's valid API key, or None when keys are off; raises 401 for a missing or
        wrong key, and 429 while the client's address has failed too often."""
        if not self.settings.api_keys:
            return None
        await self._refuse_blocked(request)
        token = bearer_token(request)
        if token is None:
            raise Unauthorized([{"loc": ["authorization"], "msg": "missing bearer API key"}])
        if not _matches(token, self.settings.api_keys):
            await self._failed(request)
            raise Unauthorized([{"loc": ["authorization"], "msg": "invalid API key"}])
        return token

    async def check_admin(self, request: Request) -> None:
        if self.settings.admin_token is None:
            raise Unauthorized(
                [
                    {
                        "loc": ["authorization"],
                        "msg": "admin endpoints are disabled: set ML_SERVICE_ADMIN_TOKEN",
                    }
                ]
            )
        await self._refuse_blocked(request)
        token = bearer_token(request)
        if token is None:  # no guess, so not a failed attempt (as for the API keys)
            raise Unauthorized([{"loc": ["authorization"], "msg": "missing bearer admin token"}])
        if not _matches(token, [self.settings.admin_token]):
            await self._failed(request)
            raise Unauthorized([{"loc": ["authorization"], "msg": "invalid admin token"}])

    # -- failed authentications, per client address ----------------------------------------------
    async def _refuse_blocked(self, request: Request) -> None:
        """429 while this address is over the failed-authentication limit (whatever it sends)."""
        address = self._name("auth-failures", _address(request))
        for limit in self.failure_limits:
            allowed, limiter = await self._count(limit, address, "test")
            if not allowed:
                raise RateLimited(
                    await self._retry_after(limiter, limit, address),
                    f"{limit} failed authentications",
                    loc="authorization",
                )

    async def _failed(self, request: Request) -> None:
        """Count a wrong key or token presented by this address (a missing one is no guess)."""
        address = self._name("auth-failures", _address(request))
        for limit in self.failure_limits:
            await self._count(limit, address, "hit")

    # -- the counters: the fleet's, else this replica's ------------------------------------------
    def _name(self, kind: str, value: str) -> str:
        """A counter's name for an API key or a client address: an HMAC under the deployment's
        secret, so the names in Redis reveal neither, and no guess can be tested without it."""
        message = f"{kind}\0{value}".encode("utf-8", "surrogatepass")
        return f"{kind}:" + hmac.new(self.secret, message, "sha256").hexdigest()[:32]

    async def _count(self, limit, key: str, op: str):
        """(allowed, the limiter that answered): `hit` counts a request, `test` only looks."""
        if self.fleet_limiter is not None:
            try:
                call = getattr(self.fleet_limiter, op)(limit, key)
                allowed = await asyncio.wait_for(call, self.shared.timeout_s)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # Redis down, slow or restarting: this replica's memory
                self.shared.failed("rate_limit", e)
            else:
                self.shared.succeeded()
                return allowed, self.fleet_limiter
        return getattr(self.limiter, op)(limit, key), self.limiter

    async def _retry_after(self, limiter, limit, key: str) -> int:
        if limiter is self.limiter:
            reset_at = self.limiter.get_window_stats(limit, key).reset_time
        else:
            try:
                stats = await asyncio.wait_for(
                    limiter.get_window_stats(limit, key), self.shared.timeout_s
                )
                reset_at = stats.reset_time
            except asyncio.CancelledError:
                raise
            except Exception as e:
                self.shared.failed("rate_limit", e)
                return max(1, math.ceil(limit.get_expiry()))  # at most one window
        return max(1, math.ceil(reset_at - time.time()))


def _counter_secret(settings: Settings) -> bytes:
    """ML_SERVICE_REDIS_SECRET; without it, a fixed key where a fleet shares Redis (and a
    warning), or a random one where the counters never leave this process."""
    if settings.redis_secret is not None:
        return settings.redis_secret.get_secret_value().encode()
    if settings.redis_url:
        log.warning(
            "ML_SERVICE_REDIS_URL is set without ML_SERVICE_REDIS_SECRET: the rate-limit and "
            "failed-authentication counters in Redis are named by a keyed hash whose key is "
            "public, so whoever reads Redis can test guesses of API keys and client addresses; "
            "give every replica the same ML_SERVICE_REDIS_SECRET"
        )
        return UNSET_SECRET
    return os.urandom(32)


def _address(request: Request) -> str:
    return request.client.host if request.client else "unknown"


async def _guard(request: Request) -> Guard:
    return request.app.state.guard


async def require_api_key(request: Request, guard: Annotated[Guard, Depends(_guard)]) -> None:
    await guard.check(request)


async def require_admin(request: Request, guard: Annotated[Guard, Depends(_guard)]) -> None:
    await guard.check_admin(request)


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
            return await BodyTooLarge(self._errors()).send(scope, receive, send)
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


class HeaderLimit:
    """ASGI middleware: 431 when the request's header fields (names and values) total more than
    `max_bytes`, before any route or other middleware reads them."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            size = sum(len(name) + len(value) for name, value in scope["headers"])
            if size > self.max_bytes:
                errors = [
                    {
                        "loc": ["headers"],
                        "msg": f"the header fields are larger than {self.max_bytes} bytes",
                    }
                ]
                return await HeadersTooLarge(errors).send(scope, receive, send)
        await self.app(scope, receive, send)


class InfoRouteGuard:
    """ASGI middleware: the API keys also guard `paths` (the routes that describe the service),
    with the same 401 and the same failed-authentication limit as the generation routes."""

    def __init__(self, app, guard: Guard, paths: frozenset[str]):
        self.app = app
        self.guard = guard
        self.paths = paths

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and _route_path(scope) in self.paths:
            try:
                await self.guard.authenticate(Request(scope))
            except ServiceError as e:
                return await e.send(scope, receive, send)
        await self.app(scope, receive, send)


def _route_path(scope) -> str:
    path, root = scope["path"], scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path
