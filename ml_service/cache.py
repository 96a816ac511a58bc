"""The response cache: a repeated deterministic request is answered without the model.

Only outputs that the request fully determines are cached: a service says which through
`ModelService.cache_key(item)` (text generation: greedy, `temperature` 0, or an explicit `seed`;
None for anything else, which is never cached). The key hashes the served version's content (its
checkpoint's SHA-256 over weights and tokenizer files, so a retrained checkpoint under the same
name never hits old entries), the prompt's token ids and every generation parameter after
defaults. The value is the whole output (text, token ids, finish reason, usage, logprobs).

Where: in this replica's memory (an LRU of `cache_max_entries` with a TTL of `cache_ttl_s`), or in
the fleet's Redis (`ml_service:cache:<key>` with the TTL) when `ML_SERVICE_REDIS_URL` is set; a
Redis that fails or is slow is skipped (a miss, nothing stored), never an error. A client opts out
with `"cache": false` in the body or `Cache-Control: no-cache` (do not read; the fresh answer is
still stored) / `no-store` (neither). Each item counts as a `hit`, a `miss` or a `bypass` in
`ml_service_cache_requests_total{result}`; the response's `X-Cache` header says the same for the
whole request (`hit` when every item hit, `miss` when any missed, else `bypass`).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter
from starlette.requests import Request

from ml_service.observability import PREFIX
from ml_service.settings import Settings
from ml_service.shared import SharedStore

KEY_PREFIX = "ml_service:cache:"


@dataclass
class CachePlan:
    """What the cache holds for one request's items: a key per item (None: not cached) and, for
    the items it had, their outputs."""

    keys: list[str | None]
    found: list[Any | None]
    write: bool
    results: list[str] = field(default_factory=list)  # hit | miss | bypass, per item

    def missing(self) -> list[int]:
        """The items the model must run."""
        return [i for i, out in enumerate(self.found) if out is None]

    def merged(self, fresh: list) -> list:
        """Every item's output: the cached ones, and `fresh` (for `missing()`, in order)."""
        out = list(self.found)
        for i, o in zip(self.missing(), fresh, strict=True):
            out[i] = o
        return out

    @property
    def summary(self) -> str:
        if self.results and all(r == "hit" for r in self.results):
            return "hit"
        return "miss" if "miss" in self.results else "bypass"


class ResponseCache:
    def __init__(
        self,
        settings: Settings,
        shared: SharedStore,
        registry: CollectorRegistry,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.ttl_s = settings.cache_ttl_s
        self.max_entries = settings.cache_max_entries
        self.shared = shared
        self.clock = clock
        self._memory: OrderedDict[str, tuple[float, str]] = OrderedDict()  # key -> (expiry, json)
        self._storing: set[asyncio.Task] = set()
        self.requests = Counter(
            f"{PREFIX}_cache_requests",
            "model requests (per item of a batch, per choice) by cache result: hit (answered from "
            "the cache), miss (run, then stored), bypass (not cacheable, or the client opted out)",
            ["result"],
            registry=registry,
        )

    @property
    def enabled(self) -> bool:
        return self.ttl_s > 0

    # -- storage: JSON objects by key -------------------------------------------------------------
    async def get(self, key: str) -> dict | None:
        """The value stored under `key`, or None: absent, expired, unreadable, or Redis failed."""
        if self.shared.enabled:
            raw = await self.shared.run(
                "cache", lambda: self.shared.client.get(KEY_PREFIX + key), None
            )
        else:
            raw = self._memory_get(key)
        if raw is None:
            return None
        try:
            value = json.loads(raw)
        except ValueError:  # not JSON (another writer): a miss
            return None
        return value if isinstance(value, dict) else None

    async def put(self, key: str, value: dict) -> None:
        """Store `value` (JSON-ready) for `cache_ttl_s`; a Redis that fails stores nothing."""
        text = json.dumps(value, ensure_ascii=False)
        if self.shared.enabled:
            ttl_ms = max(1, int(self.ttl_s * 1000))
            await self.shared.run(
                "cache", lambda: self.shared.client.set(KEY_PREFIX + key, text, px=ttl_ms), None
            )
            return
        # kept as text: a caller that changes what `get` returned cannot change the entry
        self._memory[key] = (self.clock() + self.ttl_s, text)
        self._memory.move_to_end(key)
        while len(self._memory) > self.max_entries:
            self._memory.popitem(last=False)

    def _memory_get(self, key: str) -> str | None:
        entry = self._memory.get(key)
        if entry is None:
            return None
        expiry, text = entry
        if self.clock() >= expiry:
            del self._memory[key]
            return None
        self._memory.move_to_end(key)  # the most recently used goes last (evicted last)
        return text

    # -- a request's items ------------------------------------------------------------------------
    async def plan(
        self, request: Request, service, items: list, opted_in: bool = True
    ) -> CachePlan:
        """Look up every cacheable item (concurrently); sets `request.state.cache` for the
        `X-Cache` header and counts each item's result."""
        read, write = self._policy(request, opted_in)
        keys = [service.cache_key(it) if (read or write) else None for it in items]
        values = await asyncio.gather(
            *(self.get(k) if (k is not None and read) else _none() for k in keys)
        )
        found, results = [], []
        for key, data in zip(keys, values, strict=True):
            output = _decode(service, data)
            found.append(output)
            results.append(
                "bypass" if key is None or not read else "hit" if output is not None else "miss"
            )
        for r in results:
            self.requests.labels(result=r).inc()
        plan = CachePlan(keys, found, write, results)
        request.state.cache = plan.summary
        return plan

    async def store(self, plan: CachePlan, service, fresh: list) -> None:
        """Store the outputs the model just made for `plan.missing()` (complete ones only)."""
        if not plan.write:
            return
        puts = [
            self.put(key, service.cache_encode(out))
            for key, out in zip((plan.keys[i] for i in plan.missing()), fresh, strict=True)
            if key is not None and service.cache_complete(out)
        ]
        await asyncio.gather(*puts)

    def store_later(self, key: str | None, service, output) -> None:
        """`store` for one streamed output, from inside the stream (never delays its end)."""
        if key is None or not service.cache_complete(output):
            return
        task = asyncio.ensure_future(self.put(key, service.cache_encode(output)))
        self._storing.add(task)
        task.add_done_callback(self._storing.discard)

    def _policy(self, request: Request, opted_in: bool) -> tuple[bool, bool]:
        """(read, write) for this request."""
        if not self.enabled or not opted_in:
            return False, False
        directives = {
            d.strip().lower() for d in request.headers.get("cache-control", "").split(",")
        }
        if "no-store" in directives:
            return False, False
        return "no-cache" not in directives, True


async def _none() -> None:
    return None


def _decode(service, data: dict | None):
    if data is None:
        return None
    try:
        return service.cache_decode(data)
    except (ValueError, TypeError, KeyError):  # an entry from another release: a miss
        return None


class CachedStream:
    """A cached output as a stream (the same interface as the engine's `TokenStream`): its whole
    text as one piece, then the output."""

    def __init__(self, output):
        self.output = output

    async def __aiter__(self):
        if self.output.text:
            yield self.output.text
        yield self.output

    def cancel(self) -> None:
        pass

    def interrupt(self, error: BaseException) -> None:
        pass


class StoringStream:
    """The engine's stream of a cacheable item: passes every event through, and stores the final
    output once it comes."""

    def __init__(self, stream, cache: ResponseCache, key: str, service):
        self.stream, self.cache, self.key, self.service = stream, cache, key, service

    async def __aiter__(self):
        async for event in self.stream:
            if not isinstance(event, str):
                self.cache.store_later(self.key, self.service, event)
            yield event

    def cancel(self) -> None:
        self.stream.cancel()

    def interrupt(self, error: BaseException) -> None:
        self.stream.interrupt(error)
