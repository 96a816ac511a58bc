"""The pipe protocol between the front (`client.py`) and the engine process (`worker.py`).

Two one-way pipes (`multiprocessing.connection.Connection`, pickled tuples). The front sends
`("add", [(rid, ids, params, arrived_at, streamed), ...])`, `("cancel", [rid, ...])`,
`("call", rid, name, args)` (a blocking call such as `prompt_logprobs`), `("abort", error)` and
`("stop", timeout)`. The engine sends `("ready", pid, phases)` (`phases`: the `time.monotonic()` of
its start's steps: imports done, spec received, model loaded, warmed up) or `("failed", reason)`
once, then, once per decode step, `("events", running, [event, ...])`: every piece of text, result
and metric event of that step, and how many rows it runs. An event is a tuple whose first item is
its kind below.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from dataclasses import dataclass

from lib.inference.contract import EngineObserver

# event kinds in the engine's per-step message
TEXT, DONE, ADMITTED, STEP, TOKENS, FINISHED, PREFIX = range(7)


@dataclass(frozen=True)
class RequestInfo:
    """What the metrics observer reads of a request (the engine process's timings)."""

    arrived_at: float
    prompt_tokens: int = 0
    first_token_at: float | None = None


@dataclass
class Pending:
    loop: asyncio.AbstractEventLoop | None  # None: a blocking call (`prompt_logprobs`)
    on_text: Callable | None
    on_done: Callable


class ChannelOutbox:
    """The engine process's side of `engine._Outbox`: a step's events go out as one message."""

    def __init__(self, conn):
        self._conn = conn
        self._events: list[tuple] = []
        self._lock = threading.Lock()
        self.running: Callable[[], int] = lambda: 0
        self._last_running = -1

    def add(self, event: tuple) -> None:
        with self._lock:
            self._events.append(event)

    def flush(self) -> None:
        with self._lock:
            events, self._events = self._events, []
            running = self.running()
            if events or running != self._last_running:
                self._last_running = running
                self._conn.send(("events", running, events))


class ShippingObserver(EngineObserver):
    """Metric events, shipped to the front with the step's message."""

    def __init__(self, out: ChannelOutbox):
        self.out = out

    def on_admitted(self, request) -> None:
        self.out.add((ADMITTED, request.arrived_at, request.prompt_tokens))

    def on_step(self, batch_size: int, seconds: float) -> None:
        self.out.add((STEP, batch_size, seconds))

    def on_tokens(self, count: int, gaps: list[float]) -> None:
        self.out.add((TOKENS, count, gaps))

    def on_finished(self, request) -> None:
        self.out.add((FINISHED, request.arrived_at, request.first_token_at))

    def on_prefix_cache(
        self, prompt_tokens: int, cached_tokens: int, evictions: int, blocks: int
    ) -> None:
        self.out.add((PREFIX, prompt_tokens, cached_tokens, evictions, blocks))
