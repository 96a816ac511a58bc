"""The serving engine: continuous (iteration-level) batching over one `DecodeBatch`.

Requests wait in a bounded queue. One decoding thread runs the loop: one decode step for every
running sequence, then the prompts of waiting requests are admitted into the free rows. A finished
sequence leaves the batch at once and a waiting request takes its row at the next step, so nobody
waits for the longest sequence of a batch. When the engine is idle, the first request waits at most
`max_wait_s` for company before its batch starts.

The engine knows nothing of HTTP: it takes token ids and `GenerationParams`, and gives results
(`submit`) or pieces of text (`stream`) to asyncio callers. What one step produces for callers on
one event loop reaches that loop in one hand-over (not one per token), so a busy batch does not
flood the loop with wake-ups. A caller that goes away (its task is
cancelled) cancels its sequence, which leaves the batch at the next step.

The decoding thread does the model's math with `threads` CPU threads (default: by model size:
see `default_math_threads`), and it should be the only
thread of the process that uses more than one. torch's OpenMP runtime (libgomp) keeps a pool of
worker threads for each thread that ever ran a parallel operation; once the pools together hold
more threads than there are cores, its workers stop spinning between parallel regions and sleep
after each one, which roughly doubled a decode step's time here (BENCHMARKS.md, "Reading these numbers").
So load and warm up with `torch.set_num_threads(1)` in the loading thread, as `ml_service` does; the
engine sets its own count when its thread starts.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from collections.abc import Callable, Sequence

import torch

from lib.inference.adapters import AdapterError
from lib.inference.contract import (
    Engine,
    EngineCapabilities,
    EngineObserver,
    EngineStopped,
    send_to_loops,
)
from lib.inference.generation import DecodeBatch
from lib.inference.limits import (
    ADAPTER_MB,
    ENGINE_MAX_BATCH_SIZE,
    ENGINE_MAX_QUEUE,
    ENGINE_MAX_WAIT_S,
    default_math_threads,
)
from lib.inference.quantization import served_parameters
from lib.inference.rows import GenerationRequest
from lib.inference.types import GenerationFailed, GenerationResult

log = logging.getLogger(__name__)


class GenerationEngine(Engine):
    """Our continuous-batching engine in a thread of this process (`ML_SERVICE_ENGINE=thread`;
    the engine process runs one too)."""

    capabilities = EngineCapabilities(adapters=True)
    family = "ours"

    @classmethod
    def create(cls, spec, *, model=None, observer=None) -> GenerationEngine:
        """The engine over `model`, an `InferenceService` loaded in this process."""
        if model is None:
            raise ValueError("the thread engine runs a model loaded in this process: pass model=")
        return model.create_engine(
            max_batch_size=spec.max_batch_size,
            max_wait_s=spec.max_wait_s,
            max_queue=spec.max_queue,
            observer=observer,
            threads=spec.threads,
            prefix_cache_mb=spec.prefix_cache_mb,
            adapters=spec.adapters,
            adapter_mb=spec.adapter_mb,
        )

    def __init__(
        self,
        model,
        tokenizer,
        *,
        max_batch_size: int = ENGINE_MAX_BATCH_SIZE,
        max_wait_s: float = ENGINE_MAX_WAIT_S,
        max_queue: int = ENGINE_MAX_QUEUE,
        lock: threading.Lock | None = None,
        observer: EngineObserver | None = None,
        threads: int | None = None,
        outbox: _Outbox | None = None,
        prompt_scorer: Callable | None = None,
        prefix_cache_mb: int = 0,
        adapters: Sequence[tuple[str, str]] = (),
        adapter_mb: int = ADAPTER_MB,
        base_sha256: str | None = None,
    ):
        # the model's math, on the engine thread (default: by the model's size, limits.py)
        self.threads = threads or default_math_threads(served_parameters(model))
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self.observer = observer or EngineObserver()
        self._batch = DecodeBatch(
            model,
            tokenizer,
            max_batch_size,
            observer=self.observer,
            prefix_cache_bytes=prefix_cache_mb << 20,
            adapter_bytes=adapter_mb << 20,
            base_sha256=base_sha256,
        )
        for name, path in adapters:  # the adapters directory's (a bad one is skipped, and said)
            try:
                self._batch.adapters.add(name, path)
            except AdapterError as e:
                log.error("adapter %r not loaded: %s", name, e)
        self._lock = lock or threading.Lock()  # shared with other users of the model
        self._queue: collections.deque[GenerationRequest] = collections.deque()
        self._cond = threading.Condition()
        self._closing = False
        self._thread: threading.Thread | None = None
        # where a step's pieces and results go (once per step): event loops in this process,
        # or the channel to the front process (engine_process/protocol.py)
        self._outbox = outbox or _Outbox()
        self._prompt_scorer = prompt_scorer  # InferenceService.prompt_logprobs, when it has one

    # -- state ----------------------------------------------------------------------------------
    @property
    def waiting(self) -> int:
        return len(self._queue)

    @property
    def running(self) -> int:
        return len(self._batch.rows)

    def has_room(self, n: int = 1) -> bool:
        """Whether `n` more requests would fit in the queue now (requests cancelled while they
        waited, by a timeout or a departed client, give their places up)."""
        if len(self._queue) + n <= self.max_queue:
            return True
        with self._cond:
            self._drop_cancelled()
            return len(self._queue) + n <= self.max_queue

    # -- life cycle -----------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._closing = False
            self._thread = threading.Thread(target=self._run, name="generation-engine", daemon=True)
            self._thread.start()

    @property
    def stopped(self) -> bool:
        """Whether its decoding thread has ended (after `stop`), or never started."""
        return self._thread is None

    def stop(self, timeout: float = 30.0) -> None:
        """Take no new requests, finish the queued and running ones (up to `timeout`), then end."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("generation engine still busy after %.0fs; cancelling", timeout)
                self._cancel_all()
                self._thread.join(5)
            self._thread = None

    def abort(self, error: BaseException) -> None:
        """Take no new requests and end every queued and running one now with `error` (e.g.
        `EngineStopped` when a shutdown's grace period is over): each caller gets an answer
        instead of being cut off. Blocks until the decoding thread has ended: call it off the
        event loop. `stop()` still works afterwards (it has nothing left to wait for)."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        while True:
            # holding the model lock, the batch is between two steps; holding the condition, the
            # decoding thread is not choosing what to admit. A request it took from the queue just
            # before is admitted after we let go: the next round ends it.
            with self._lock, self._cond:
                queued, self._queue = list(self._queue), collections.deque()
                for r in queued:
                    self._batch.finish_request(r, error)
                if self._batch.rows:
                    self._batch.fail(error)
            self._outbox.flush()
            thread = self._thread
            if thread is None:
                return
            thread.join(0.05)  # ends by itself: closing, with nothing queued or running
            if not thread.is_alive():
                return

    # -- submitting -----------------------------------------------------------------------------
    def enqueue(self, requests: Sequence[GenerationRequest]) -> None:
        """Queue requests together (all or none): QueueFull or EngineStopped otherwise."""
        with self._cond:
            if self._closing or self._thread is None:
                raise EngineStopped("the generation engine is not running")
            if not self.has_room(len(requests)):
                raise self.queue_full()
            self._queue.extend(requests)
            self._cond.notify()

    def _enqueue(self, items, loop, delivers, streamed: bool) -> list[GenerationRequest]:
        requests = []
        for item, deliver in zip(items, delivers, strict=True):
            send = self._outbox.sender(loop, deliver)
            on_text = send if streamed else None
            requests.append(GenerationRequest(item.ids, item.params, on_text=on_text, on_done=send))
        self.enqueue(requests)
        return requests

    def add_adapter(self, name: str, path: str) -> dict:
        with self._lock:
            return self._batch.adapters.add(name, path).describe()

    def remove_adapter(self, name: str) -> None:
        with self._lock:
            self._batch.adapters.remove(name)

    def list_adapters(self) -> list[dict]:
        with self._lock:
            return self._batch.adapters.describe()

    def prompt_logprobs(self, ids, top: int = 0):
        """The model's scoring of a prompt (`InferenceService.prompt_logprobs`), under its lock."""
        if self._prompt_scorer is None:
            return super().prompt_logprobs(ids, top)
        return self._prompt_scorer(ids, top)

    # -- the decoding thread --------------------------------------------------------------------
    def _run(self) -> None:
        torch.set_num_threads(self.threads)  # this thread's OpenMP team (see the module docstring)
        batch = self._batch
        while True:
            with self._cond:
                while not self._queue and not batch.rows:
                    if self._closing:
                        return
                    self._cond.wait()
                if not batch.rows and len(self._queue) < batch.free and self.max_wait_s > 0:
                    # idle: give the first request a moment for company
                    deadline = time.monotonic() + self.max_wait_s
                    while (
                        len(self._queue) < batch.free and (left := deadline - time.monotonic()) > 0
                    ):
                        self._cond.wait(left)
                admitted = [self._queue.popleft() for _ in range(min(batch.free, len(self._queue)))]
            self._iterate(admitted)

    def _iterate(self, admitted: list[GenerationRequest]) -> None:
        batch = self._batch
        t0 = time.monotonic()
        size = len(batch.rows) + len(admitted)
        for r in admitted:
            self.observer.on_admitted(r)
        # A row whose numbers go wrong, or that makes the model raise even alone, fails by
        # itself inside `step`/`admit`; what reaches here could not be pinned on one row: a failed
        # step fails the running rows, a failed admission only the requests being admitted.
        with self._lock:
            if batch.rows:
                try:
                    batch.step()
                except Exception as e:
                    log.exception("generation failed for a batch of %d", len(batch.rows))
                    batch.fail(GenerationFailed(str(e)))
            if admitted:
                try:
                    batch.admit(admitted)
                except Exception as e:
                    log.exception("admitting %d new requests failed", len(admitted))
                    batch.fail_requests(admitted, GenerationFailed(str(e)))
        self.observer.on_step(size, time.monotonic() - t0)
        self._outbox.flush()

    def discard_cancelled(self) -> None:
        """Finish now the waiting requests that were cancelled (they give their places up)."""
        with self._cond:
            self._drop_cancelled()

    def _drop_cancelled(self) -> None:
        """Finish the waiting requests that were cancelled (call holding the condition)."""
        gone = [r for r in self._queue if r.cancelled]
        if gone:
            self._queue = collections.deque(r for r in self._queue if not r.cancelled)
            for r in gone:
                self._batch.finish_request(r, GenerationResult("", "cancelled", r.prompt_tokens, 0))
            self._outbox.flush()

    def _cancel_all(self) -> None:
        with self._cond:
            queued, self._queue = list(self._queue), collections.deque()
        for r in queued:
            self._batch.finish_request(r, GenerationResult("", "cancelled", r.prompt_tokens, 0))
        for row in list(self._batch.rows):
            row.request.cancel()
        self._outbox.flush()


class _Outbox:
    """Deliveries from the decoding thread to event loops, sent once per step: one
    `call_soon_threadsafe` per loop carries every piece and result the step produced for it."""

    def __init__(self):
        self._pending: list[tuple[asyncio.AbstractEventLoop, Callable, object]] = []
        self._lock = threading.Lock()  # stop() may cancel from another thread

    def sender(self, loop: asyncio.AbstractEventLoop, fn: Callable) -> Callable:
        def send(item) -> None:
            with self._lock:
                self._pending.append((loop, fn, item))

        return send

    def flush(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for loop, fn, item in pending:
            by_loop.setdefault(loop, []).append((fn, item))
        send_to_loops(by_loop)
