"""The engine seam between routes and models, and a generic micro-batcher behind it.

Routes talk to an `Engine`: `submit`/`submit_many` give outputs for preprocessed inputs, `has_room`
says whether the bounded queue takes more. The text-generation service brings its own engine
(continuous batching, `lib/inference/engine.py`, which can also `stream`); every other service gets
the `MicroBatcher`: requests wait at most `max_wait_s` for company, and while the model works on one
batch new requests queue up and form the next. `predict` runs in one worker thread, off the event
loop, so the API keeps answering (health probes, metadata) while the model is busy.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, InvalidStateError
from typing import Any, Protocol

from lib.inference import EngineStopped, QueueFull
from ml_service.settings import Settings

log = logging.getLogger("ml_service.batching")
DEFAULTS = Settings.model_fields  # the service's settings hold the defaults, once


class PredictionFailed(RuntimeError):
    """`predict` raised for the batch this request was in."""


class Engine(Protocol):
    """What routes need from whatever runs the model."""

    def start(self) -> None: ...

    def stop(self, timeout: float = 30.0) -> None: ...

    def abort(self, error: BaseException) -> None:
        """End every queued and running request now with `error` (blocking; the app calls it,
        off the event loop, when a shutdown's grace period is over). Optional for a service's
        own engine: without it, what is left when the grace ends is cut off by the server."""

    def has_room(self, n: int = 1) -> bool: ...

    async def submit(self, item: Any) -> Any: ...

    async def submit_many(self, items: Sequence[Any]) -> list[Any]: ...


class MicroBatcher:
    def __init__(
        self,
        predict: Callable[[list], list],
        max_batch_size: int = DEFAULTS["max_batch_size"].default,
        max_wait_s: float = DEFAULTS["batch_wait_ms"].default / 1000,
        max_queue: int = DEFAULTS["max_queue"].default,
        observer=None,
    ):
        self._predict = predict
        self.observer = observer
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self._queue: queue.Queue[tuple[Any, Future] | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._running = 0
        self._live: list[Future] = []  # the batch `predict` is working on
        self._aborted: BaseException | None = None

    @property
    def waiting(self) -> int:
        return self._queue.qsize()

    @property
    def running(self) -> int:
        return self._running

    def has_room(self, n: int = 1) -> bool:
        return self._queue.qsize() + n <= self.max_queue

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="micro-batcher", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the queued work, then end the worker."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout)
            self._thread = None

    def abort(self, error: BaseException) -> None:
        """Take no new requests; end the queued ones and the batch in `predict` now with `error`
        (that `predict` runs on, and its outputs are dropped). The worker then ends."""
        self._aborted = error
        for fut in list(self._live):
            _settle(fut, error)
        while True:
            try:
                entry = self._queue.get_nowait()
            except queue.Empty:
                break
            if entry is not None:
                _settle(entry[1], error)
        self._queue.put(None)  # the worker ends after its current batch

    async def submit_many(self, items: Sequence[Any]) -> list[Any]:
        """Outputs for `items`, in order. They are queued together, so they share batches."""
        if self._thread is None or self._aborted is not None:
            raise EngineStopped("the micro-batcher is not running")
        if not self.has_room(len(items)):
            raise QueueFull(f"{self.waiting} requests are waiting (the limit is {self.max_queue})")
        futures = [Future() for _ in items]
        for item, fut in zip(items, futures, strict=True):
            self._queue.put((item, fut))
        try:
            return list(await asyncio.gather(*(asyncio.wrap_future(f) for f in futures)))
        finally:
            for f in futures:
                f.cancel()  # the caller went away: queued items are skipped

    async def submit(self, item: Any) -> Any:
        return (await self.submit_many([item]))[0]

    def _run(self) -> None:
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            deadline = time.monotonic() + self.max_wait_s
            while len(batch) < self.max_batch_size:
                try:
                    nxt = self._queue.get(timeout=max(deadline - time.monotonic(), 0))
                except queue.Empty:
                    break
                if nxt is None:
                    stopping = True
                    break
                batch.append(nxt)
            self._run_batch(batch)

    def _run_batch(self, batch: list[tuple[Any, Future]]) -> None:
        live = [(item, fut) for item, fut in batch if fut.set_running_or_notify_cancel()]
        if not live:
            return
        self._live = [fut for _, fut in live]
        if self._aborted is not None:  # abort() came while this batch was being gathered
            for fut in self._live:
                _settle(fut, self._aborted)
            self._live = []
            return
        self._running = len(live)
        t0 = time.monotonic()
        try:
            outputs = self._predict([item for item, _ in live])
            if len(outputs) != len(live):
                raise RuntimeError(
                    f"predict returned {len(outputs)} outputs for {len(live)} inputs"
                )
        except Exception as e:
            log.exception("predict failed for a batch of %d", len(live))
            for _, fut in live:
                _settle(fut, PredictionFailed(str(e)))
            return
        finally:
            self._running = 0
            self._live = []
            if self.observer is not None:
                self.observer.on_step(len(live), time.monotonic() - t0)
        for (_, fut), out in zip(live, outputs, strict=True):
            _settle(fut, out)


def _settle(fut: Future, outcome: Any) -> None:
    """Give `fut` its output or exception, unless it has one already (abort() came first)."""
    with contextlib.suppress(InvalidStateError):
        if isinstance(outcome, BaseException):
            fut.set_exception(outcome)
        else:
            fut.set_result(outcome)
