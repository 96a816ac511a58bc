"""The fleet's shared store: one Redis that every replica of the service talks to, or none.

Redis is an optimisation, never a dependency of correctness: rate limits, the response cache and
the A/B split work in each replica's memory without it. With `ML_SERVICE_REDIS_URL` set, every call
goes through `SharedStore.run`, which bounds it by `redis_timeout_ms` and, when Redis is down, slow
or restarting, returns the caller's fallback instead of raising. Each episode of trouble is logged
once (when it starts, and once when Redis answers again) and every fallback is counted in
`ml_service_redis_fallbacks_total{use=...}`; `ml_service_redis_up` says how the last call went.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge

from ml_service.observability import PREFIX

log = logging.getLogger("ml_service")
T = TypeVar("T")


class SharedStore:
    """`client` is a redis-py asyncio client (None without a URL). Use `run` for every call."""

    def __init__(self, url: str | None, timeout_ms: float, registry: CollectorRegistry):
        self.url = url
        self.timeout_s = timeout_ms / 1000
        self.client = None
        self.pool = None
        self.fallbacks = Counter(
            f"{PREFIX}_redis_fallbacks",
            "Redis calls that failed or timed out and fell back to the replica's memory (or "
            "skipped the cache), by use (rate_limit, cache, traffic)",
            ["use"],
            registry=registry,
        )
        self.up = Gauge(
            f"{PREFIX}_redis_up",
            "1 when the last call to the shared Redis succeeded, 0 when it failed; absent "
            "(always 0) without ML_SERVICE_REDIS_URL",
            registry=registry,
        )
        self._failing = False
        if url:
            from redis.asyncio import ConnectionPool, Redis

            # no retries inside the client: a failed call falls back at once, the next one retries
            self.pool = ConnectionPool.from_url(
                url,
                socket_timeout=self.timeout_s,
                socket_connect_timeout=self.timeout_s,
                health_check_interval=30,
            )
            self.client = Redis(connection_pool=self.pool)

    @property
    def enabled(self) -> bool:
        return self.client is not None

    @property
    def healthy(self) -> bool:
        """Whether the last call succeeded (False without Redis)."""
        return self.enabled and not self._failing

    async def run(self, use: str, call: Callable[[], Awaitable[T]], fallback: T) -> T:
        """`await call()` within the timeout, or `fallback` when Redis is off, fails or is slow."""
        if not self.enabled:
            return fallback
        try:
            result = await asyncio.wait_for(call(), self.timeout_s)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # any failure of the store: connection, timeout, protocol
            self.failed(use, e)
            return fallback
        self.succeeded()
        return result

    def failed(self, use: str, error: BaseException) -> None:
        """Count a fallback (for callers that talk to Redis through a library, like `limits`)."""
        self.fallbacks.labels(use=use).inc()
        self.up.set(0)
        if not self._failing:
            self._failing = True
            log.warning(
                "Redis unavailable (%s: %s): falling back to this replica's memory until it "
                "answers again",
                type(error).__name__,
                error,
            )

    def succeeded(self) -> None:
        self.up.set(1)
        if self._failing:
            self._failing = False
            log.info("Redis answers again: rate limits, cache and A/B state are shared again")

    async def close(self) -> None:
        if self.client is not None:
            await self.client.aclose()
            await self.pool.aclose()
