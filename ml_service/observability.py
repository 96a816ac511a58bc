"""Prometheus metrics and structured access logs.

`ServiceMetrics` owns one registry per app (so tests can build many apps), observes the engine
through `lib`'s `EngineObserver` hooks (queue time, time to first token, inter-token latency, batch
sizes, tokens) and is read by `GET /metrics`. `AccessLog` is a plain ASGI middleware (it never
buffers a streamed body): it gives every request an id (`X-Request-ID`, taken from the client or
made), counts it by route and status, times it, and writes one JSON line per request.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from lib.inference import EngineObserver

access_log = logging.getLogger("ml_service.access")

PREFIX = "ml_service"
# buckets after vLLM's: latencies from milliseconds to minutes
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1, 2.5)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
METRICS_CONTENT_TYPE = CONTENT_TYPE_LATEST


class ServiceMetrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()

        def histogram(name: str, doc: str, buckets, labels=()) -> Histogram:
            return Histogram(f"{PREFIX}_{name}", doc, labels, buckets=buckets, registry=r)

        def counter(name: str, doc: str, labels=()) -> Counter:
            return Counter(f"{PREFIX}_{name}", doc, labels, registry=r)

        def gauge(name: str, doc: str, labels=()) -> Gauge:
            return Gauge(f"{PREFIX}_{name}", doc, labels, registry=r)

        self.requests = counter(
            "requests", "HTTP requests by route and status", ["route", "status"]
        )
        self.failures = counter(
            "request_failures",
            "failed requests by reason (bad_request, unauthorized, rate_limited, queue_full, "
            "shutdown, not_ready, timeout, model_error, cancelled, internal), streams included",
            ["reason"],
        )

        self.e2e = histogram(
            "e2e_request_latency_seconds",
            "end-to-end request latency (until the last byte of a stream)",
            LATENCY_BUCKETS,
            ["route"],
        )
        # the engine's metrics carry the model version that served them (A/B dashboards)
        v = ["version"]
        self.queue_time = histogram(
            "request_queue_time_seconds",
            "time a generation waited in the queue before its prompt was processed",
            LATENCY_BUCKETS,
            v,
        )
        self.ttft = histogram(
            "time_to_first_token_seconds",
            "time from a generation's arrival to its first token",
            TTFT_BUCKETS,
            v,
        )
        self.itl = histogram(
            "inter_token_latency_seconds",
            "time between two successive tokens of one generation",
            ITL_BUCKETS,
            v,
        )
        self.batch_size = histogram(
            "batch_size", "sequences in the batch at each model step", BATCH_BUCKETS, v
        )
        self.prompt_tokens = counter("prompt_tokens", "prompt tokens processed", v)
        self.generation_tokens = counter("generation_tokens", "tokens generated", v)
        self.prefix_prompt_tokens = counter(
            "prefix_cache_queries",
            "prompt tokens looked up in the prefix cache (hit rate: prefix_cache_hits / this)",
            v,
        )
        self.prefix_hits = counter(
            "prefix_cache_hits",
            "prompt tokens served from the prefix cache (their keys and values copied, not computed)",
            v,
        )
        self.prefix_evictions = counter(
            "prefix_cache_evictions",
            "prefix-cache blocks (16 tokens) evicted to make room, least recently used first",
            v,
        )
        self.prefix_blocks = gauge(
            "prefix_cache_blocks", "blocks (16 tokens) the prefix cache holds", v
        )
        self.running = gauge("num_requests_running", "sequences in the running batch")
        self.waiting = gauge("num_requests_waiting", "requests waiting for a batch row")
        self.engine_up = gauge(
            "engine_up",
            "1 while every loaded version's engine takes requests; 0 while an engine process "
            "is restarting (or failed)",
        )
        self.engine_restarts = counter(
            "engine_restarts",
            "engine processes that died and were replaced (their in-flight requests failed)",
            v,
        )
        self.version_requests = counter(
            "version_requests",
            "model requests (POST) routed to each version (the split's choice, a pin, or the "
            "default), whatever their status",
            ["version"],
        )
        self.adapter_requests = counter(
            "adapter_requests",
            "model requests that asked for a LoRA adapter (one loaded here), by adapter, whatever "
            "their status (requests for the base model: version_requests less these)",
            ["adapter"],
        )
        self.traffic_share = gauge(
            "traffic_share",
            "each version's configured share of the traffic (absent without a split)",
            ["version"],
        )
        self.model_info = gauge(
            "model_info",
            "the model being served (value 1)",
            ["model_id", "version", "parameters", "dtype", "device"],
        )

    def set_split(self, shares: dict[str, float]) -> None:
        self.traffic_share.clear()
        for version, share in shares.items():
            self.traffic_share.labels(version=version).set(share)

    def track_engine(
        self,
        running: Callable[[], float],
        waiting: Callable[[], float],
        up: Callable[[], float] = lambda: 1.0,
    ) -> None:
        """Read the engine's state at scrape time (the functions follow a reloaded engine)."""
        self.running.set_function(running)
        self.waiting.set_function(waiting)
        self.engine_up.set_function(up)

    def set_model(self, meta: dict, version: str | None) -> None:
        self.model_info.clear()
        self.model_info.labels(
            model_id=str(meta.get("model_id", "")),
            version=str(version or ""),
            parameters=str(meta.get("parameters", "")),
            dtype=str(meta.get("dtype", "")),
            device=str(meta.get("device", "")),
        ).set(1)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def for_version(self, version: str | None) -> VersionObserver:
        """The observer of one version's engine: its metrics carry `version`."""
        return VersionObserver(self, str(version or ""))


class VersionObserver(EngineObserver):
    """`lib`'s engine hooks (called on the decoding thread) into one version's metrics."""

    def __init__(self, metrics: ServiceMetrics, version: str):
        m = metrics
        self.queue_time = m.queue_time.labels(version=version)
        self.prompt_tokens = m.prompt_tokens.labels(version=version)
        self.batch_size = m.batch_size.labels(version=version)
        self.generation_tokens = m.generation_tokens.labels(version=version)
        self.itl = m.itl.labels(version=version)
        self.ttft = m.ttft.labels(version=version)
        self.restarts = m.engine_restarts.labels(version=version)
        self.prefix = (
            m.prefix_prompt_tokens.labels(version=version),
            m.prefix_hits.labels(version=version),
            m.prefix_evictions.labels(version=version),
            m.prefix_blocks.labels(version=version),
        )

    def on_admitted(self, request) -> None:
        self.queue_time.observe(time.monotonic() - request.arrived_at)
        self.prompt_tokens.inc(request.prompt_tokens)

    def on_step(self, batch_size: int, seconds: float) -> None:
        self.batch_size.observe(batch_size)

    def on_tokens(self, count: int, gaps: list[float]) -> None:
        self.generation_tokens.inc(count)
        for gap in gaps:
            self.itl.observe(gap)

    def on_finished(self, request) -> None:
        if request.first_token_at is not None:
            self.ttft.observe(request.first_token_at - request.arrived_at)

    def on_restart(self) -> None:
        self.restarts.inc()

    def on_prefix_cache(
        self, prompt_tokens: int, cached_tokens: int, evictions: int, blocks: int
    ) -> None:
        queries, hits, evicted, held = self.prefix
        queries.inc(prompt_tokens)
        hits.inc(cached_tokens)
        evicted.inc(evictions)
        held.set(blocks)


class AccessLog:
    """ASGI middleware: request id, per-route counts and latency, one JSON log line per request.

    Routes may put `prompt_tokens`, `completion_tokens`, `adapter` and `prompt` on `request.state`; the
    prompt is logged only when `log_prompts` is on."""

    def __init__(self, app, metrics: ServiceMetrics, log_prompts: bool = False):
        self.app = app
        self.metrics = metrics
        self.log_prompts = log_prompts

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        incoming = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        request_id = incoming[:128] if incoming.strip() else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        status = 500

        async def send_with_id(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                extra = [(b"x-request-id", request_id.encode("latin-1"))]
                if version := scope["state"].get("model_version"):  # the version that served it
                    extra.append((b"x-model-version", version.encode("utf-8", "replace")))
                if cache := scope["state"].get("cache"):  # hit | miss | bypass (ml_service/cache)
                    extra.append((b"x-cache", cache.encode()))
                message["headers"] = [*message.get("headers", []), *extra]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            self._record(scope, request_id, status, time.perf_counter() - t0)

    def _record(self, scope, request_id: str, status: int, seconds: float) -> None:
        route = scope.get("route")
        label = getattr(route, "path", None) or "unmatched"
        self.metrics.requests.labels(route=label, status=str(status)).inc()
        self.metrics.e2e.labels(route=label).observe(seconds)
        state = scope.get("state", {})
        # every error answer notes its reason (backend/errors.py), None where it is not a failure
        # (a probe's 503, a wrong path); a 5xx that noted nothing is a crash
        if "failure_reason" in state:
            reason = state["failure_reason"]
        else:
            reason = "internal" if status >= 500 else None
        if scope["method"] == "POST" and state.get("model_version"):  # a model request
            self.metrics.version_requests.labels(version=state["model_version"]).inc()
            if adapter := state.get("adapter"):  # (only a loaded one's name: a bounded label)
                self.metrics.adapter_requests.labels(adapter=adapter).inc()
        if reason is not None:
            self.metrics.failures.labels(reason=reason).inc()
        line = {
            "request_id": request_id,
            "method": scope["method"],
            "route": label,
            "path": scope["path"],
            "status": status,
            "latency_ms": round(seconds * 1000, 2),
            "client": (scope.get("client") or ("", 0))[0],
            "version": state.get("model_version"),
            "adapter": state.get("adapter"),
            "cache": state.get("cache"),
            "prompt_tokens": state.get("prompt_tokens"),
            "completion_tokens": state.get("completion_tokens"),
        }
        if self.log_prompts and "prompt" in state:
            line["prompt"] = state["prompt"]
        access_log.info(json.dumps(line, ensure_ascii=False))
