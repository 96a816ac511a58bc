"""A generic micro-batcher on the engine contract (`ENGINES["micro-batch"]`).

Services other than text generation run their model through it: requests wait at most
`max_wait_s` for company, and while the model works on one batch new requests queue up and form
the next. `predict` (a service's batch call: a list of inputs to a list of outputs) runs in one
worker thread, off the event loop, so the API keeps answering (health probes, metadata) while the
model is busy. It does not stream and scores no prompts (`capabilities`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from typing import Any

from lib.inference.contract import Engine, EngineCapabilities, EngineStopped
from lib.inference.limits import ENGINE_MAX_BATCH_SIZE, ENGINE_MAX_QUEUE, ENGINE_MAX_WAIT_S
from lib.inference.types import GenerationFailed

log = logging.getLogger(__name__)


class PredictionFailed(GenerationFailed):
    """`predict` raised for the batch this request was in (the model failed on valid input)."""


class MicroBatcher(Engine):
    capabilities = EngineCapabilities(
        generates=False, stream=False, prompt_logprobs=False, logprobs=False, seed=False
    )

    @classmethod
    def create(cls, spec, *, model=None, observer=None) -> MicroBatcher:
        """A micro-batcher over `model`, a service's `predict`."""
        if model is None:
            raise ValueError("the micro-batcher runs a service's predict: pass model=")
        return cls(
            model,
            max_batch_size=spec.max_batch_size,
            max_wait_s=spec.max_wait_s,
            max_queue=spec.max_queue,
            observer=observer,
        )

    def __init__(
        self,
        predict: Callable[[list], list],
        max_batch_size: int = ENGINE_MAX_BATCH_SIZE,
        max_wait_s: float = ENGINE_MAX_WAIT_S,
        max_queue: int = ENGINE_MAX_QUEUE,
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

    @property
    def stopped(self) -> bool:
        return self._thread is None

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
            _resolve(fut, error)
        while True:
            try:
                entry = self._queue.get_nowait()
            except queue.Empty:
                break
            if entry is not None:
                _resolve(entry[1], error)
        self._queue.put(None)  # the worker ends after its current batch

    def _enqueue(self, items, loop, delivers, streamed: bool) -> list[Future]:
        if self._thread is None or self._aborted is not None:
            raise EngineStopped("the micro-batcher is not running")
        if not self.has_room(len(items)):
            raise self.queue_full()
        futures = [Future() for _ in items]
        for fut, deliver in zip(futures, delivers, strict=True):
            fut.add_done_callback(_to_loop(loop, deliver))
        for item, fut in zip(items, futures, strict=True):
            self._queue.put((item, fut))
        return futures  # cancelling one skips it if it has not started

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
                _resolve(fut, self._aborted)
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
                _resolve(fut, PredictionFailed(str(e)))
            return
        finally:
            self._running = 0
            self._live = []
            if self.observer is not None:
                self.observer.on_step(len(live), time.monotonic() - t0)
        for (_, fut), out in zip(live, outputs, strict=True):
            _resolve(fut, out)


def _resolve(fut: Future, outcome: Any) -> None:
    """Give `fut` its output or exception, unless it has one already (abort() came first)."""
    with contextlib.suppress(InvalidStateError):
        if isinstance(outcome, BaseException):
            fut.set_exception(outcome)
        else:
            fut.set_result(outcome)


def _to_loop(loop: asyncio.AbstractEventLoop, deliver: Callable) -> Callable[[Future], None]:
    """A done-callback that hands a settled future's output or exception to `deliver` on `loop`
    (a cancelled one: its caller is gone)."""

    def done(fut: Future) -> None:
        if fut.cancelled():
            return
        error = fut.exception()
        with contextlib.suppress(RuntimeError):  # that loop is closed
            loop.call_soon_threadsafe(deliver, error if error is not None else fut.result())

    return done
