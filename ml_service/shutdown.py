"""The end of a shutdown's grace period: answer what cannot finish instead of cutting it off."""

from __future__ import annotations

import asyncio
import logging
import signal
import threading

from lib.inference import EngineStopped
from ml_service.hosting import ModelHost

log = logging.getLogger("ml_service")
# what the requests ended at the end of the grace are told (errors.py's `ShuttingDown` says it too)
SHUTTING_DOWN = "the service is shutting down"


class ShutdownGrace:
    """The end of the shutdown grace period, for requests that cannot finish within it.

    The server (uvicorn) handles SIGTERM/SIGINT: it stops accepting connections and waits for the
    open ones, and only then runs the lifespan's shutdown. So its handlers are chained here (they
    still run first-hand): the signal starts a timer of `grace_s`; when it fires, the engine ends
    every request still queued or running with `EngineStopped(SHUTTING_DOWN)`, so JSON callers get
    503 with `Retry-After` and streams an `error` event. The server waits a little longer than the
    grace (runner.SHUTDOWN_MARGIN_S) before it cancels what is left, so those answers are written.
    Installed only in the main thread, over a Python handler (a server that shuts down gracefully);
    tests' in-process clients run the app elsewhere and get none."""

    def __init__(self, host: ModelHost, grace_s: float):
        self.host = host
        self.grace_s = grace_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._previous: dict[int, object] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._aborting: asyncio.Future | None = None

    def install(self, loop: asyncio.AbstractEventLoop) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        self._loop = loop
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous = signal.getsignal(sig)
            if callable(previous):
                self._previous[sig] = previous
                signal.signal(sig, self._on_signal)

    def _on_signal(self, sig: int, frame) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self.start)
        previous = self._previous.get(sig)
        if callable(previous):
            previous(sig, frame)

    def start(self) -> None:
        """The grace period starts (once, whatever the number of signals)."""
        if self._timer is None and self._loop is not None:
            self._timer = self._loop.call_later(self.grace_s, self._expire)

    def _expire(self) -> None:
        log.warning("the shutdown grace of %g s is over: ending what is left", self.grace_s)
        self._aborting = asyncio.ensure_future(
            asyncio.to_thread(self.host.abort, EngineStopped(SHUTTING_DOWN))
        )
        self._aborting.add_done_callback(_log_abort_failure)

    async def close(self) -> None:
        """Give the server its handlers back; let a started abort finish."""
        for sig, previous in self._previous.items():
            if signal.getsignal(sig) == self._on_signal:
                signal.signal(sig, previous)
        self._previous.clear()
        if self._timer is not None:
            self._timer.cancel()
        if self._aborting is not None:  # bounded: the engine's stop() has its own timeout
            await asyncio.wait({self._aborting}, timeout=5.0)


def _log_abort_failure(task: asyncio.Future) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("ending the requests left at shutdown failed", exc_info=task.exception())
