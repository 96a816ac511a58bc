"""`EngineProcess`: the `Engine` the server holds, with the engine in a child process.

- Backpressure is decided here without a round trip: it knows what it has sent and not seen
  finish, and the engine's last reported batch size; more than `max_queue` waiting is QueueFull
  at once.
- A caller that goes away (or a closed stream) sends a cancellation; the row leaves the batch at
  the next step.
- The model loads and warms up in the engine process; the server's process holds only the
  tokenizer and the model's shape (`InferenceService.from_spec(..., weights=False)`).
- An engine process that dies (killed, out of memory, a crash in native code) is noticed at once
  (its pipe closes): every request it held ends with `EngineDied` (never a hang), `alive` is false
  while a new process loads the same model, and `restarts` counts the restarts. `/ready` and
  `/metrics` read both. While down, new requests are refused at once (`EngineRestarting`), not
  queued.
- The new process is already there: the server's standby worker, launched as soon as an engine
  is up, has imported torch and transformers and waits for a spec (launch.py), so a restart only
  loads the model and warms up. Its cost is one idle process of ~260 MB per server;
  `standby=None` goes without. A restart's log line (WARNING) gives the time of each of its
  steps (`phases`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import itertools
import logging
import threading
import time
from collections.abc import Sequence

from lib.inference.contract import (
    Engine,
    EngineCapabilities,
    EngineDied,
    EngineObserver,
    EngineRestarting,
    EngineStartFailed,
    EngineStopped,
    send_to_loops,
)
from lib.inference.engine_process.launch import STANDBY, Standby, WorkerProcess, end_process
from lib.inference.engine_process.protocol import (
    ADMITTED,
    DONE,
    FINISHED,
    PREFIX,
    STEP,
    TEXT,
    TOKENS,
    Pending,
    RequestInfo,
)
from lib.inference.limits import ENGINE_MAX_QUEUE
from lib.inference.registry import EngineSpec

log = logging.getLogger(__name__)

START_TIMEOUT_S = 600.0  # loading a large checkpoint from a slow disk
MAX_RESTARTS_IN_A_ROW = 5  # a model that kills its process at once is not restarted forever


class EngineProcess(Engine):
    """Our continuous-batching engine in a child process (see the module docstring)."""

    capabilities = EngineCapabilities(restarts=True, loads_model=True, adapters=True)
    family = "ours"  # the same decoding code as the thread engine

    @classmethod
    def create(cls, spec: EngineSpec, *, model=None, observer=None) -> EngineProcess:
        """The engine process for `spec` (it loads the model itself: `model` is not used)."""
        standby = STANDBY if spec.standby else None
        return cls(spec, max_queue=spec.max_queue, observer=observer, standby=standby)

    def __init__(
        self,
        spec: EngineSpec,
        *,
        max_queue: int = ENGINE_MAX_QUEUE,
        observer: EngineObserver | None = None,
        restart: bool = True,
        start_timeout_s: float = START_TIMEOUT_S,
        standby: Standby | None = STANDBY,
    ):
        self.spec = spec
        self.max_queue = max_queue
        self.max_batch_size = spec.max_batch_size
        self.observer = observer or EngineObserver()
        self.restart = restart
        self.start_timeout_s = start_timeout_s
        self.standby = standby  # what replaces a dead one (launch.py); None: a new worker
        self._holds_standby = False
        self.restarts = 0  # how many times a dead engine process was replaced
        self.pid: int | None = None
        self._process = None
        self._send_end = None
        self._lock = threading.Lock()  # the send end, `_pending`, `_state`
        self._pending: dict[int, Pending] = {}
        self._ids = itertools.count()
        self._running = 0  # rows in the engine's batch at its last step
        self._state = "stopped"  # starting | up | restarting | closing | stopped | failed
        self._reader: threading.Thread | None = None
        # when the last start's steps happened (time.monotonic(), both processes): the log line
        # of a restart lists them, and bench/restart_bench.py reads it
        self.phases: dict[str, float] = {}

    # -- state ----------------------------------------------------------------------------------
    @property
    def alive(self) -> bool:
        """Whether the engine process is up and taking requests."""
        return self._state == "up"

    @property
    def state(self) -> str:
        return self._state

    @property
    def stopped(self) -> bool:
        return self._state in ("stopped", "failed")

    @property
    def running(self) -> int:
        return self._running

    @property
    def waiting(self) -> int:
        """What the front has sent and not seen finish, less the rows the engine runs."""
        return max(0, len(self._pending) - self._running)

    # -- life cycle -----------------------------------------------------------------------------
    def start(self) -> None:
        """Start the engine process and wait until its model is loaded and warmed up (blocking:
        call it off the event loop). EngineStartFailed when it cannot load."""
        if self._state != "stopped":
            return
        self._state = "starting"
        try:
            worker = self._load(WorkerProcess())
        except BaseException:
            self._state = "stopped"
            raise
        self._state = "up"
        self._reader = threading.Thread(
            target=self._read, args=(worker,), name="engine-reader", daemon=True
        )
        self._reader.start()
        if self.standby is not None:
            self._holds_standby = True
            self.standby.hold()

    def _load(self, worker: WorkerProcess) -> WorkerProcess:
        """Have `worker` load the model (see launch.py) and make it the engine process."""
        phases = worker.load(self.spec, self.start_timeout_s)
        with self._lock:
            self._process, self._send_end, self.pid = worker.process, worker.send_end, worker.pid
        self.phases = phases
        log.info("engine process %d is ready", self.pid)
        return worker

    def stop(self, timeout: float = 30.0) -> None:
        """Take no new requests, let the engine finish the queued and running ones (up to
        `timeout`), then end its process."""
        with self._lock:
            if self._state in ("stopped", "failed"):
                return
            self._state = "closing"
            process = self._process
        self._release_standby()
        self._send(("stop", timeout))
        if process is not None and not end_process(process, timeout + 10):
            log.warning("engine process %s did not stop in time; it was killed", self.pid)
        if self._reader is not None and self._reader is not threading.current_thread():
            self._reader.join(10)
        self._fail_pending(EngineStopped("the generation engine stopped"))
        self._state = "stopped"

    def abort(self, error: BaseException) -> None:
        """End every queued and running request now with `error`, and take no new ones."""
        with self._lock:
            if self._state in ("stopped", "failed"):
                return
            self._state = "closing"
        self._fail_pending(error)
        self._send(("abort", error))

    # -- submitting -----------------------------------------------------------------------------
    def _enqueue(self, items, loop, delivers, streamed: bool) -> list[_RemoteRequest]:
        pendings = [Pending(loop, d if streamed else None, d) for d in delivers]
        with self._lock:
            if self._state == "restarting":
                raise EngineRestarting("the engine process is restarting after a crash")
            if self._state != "up":
                raise EngineStopped("the generation engine is not running")
            if not self.has_room(len(items)):
                raise self.queue_full()
            rids = [next(self._ids) for _ in items]
            for rid, p in zip(rids, pendings, strict=True):
                self._pending[rid] = p
            now = time.monotonic()
            message = (
                "add",
                [
                    (rid, list(item.ids), item.params, now, streamed)
                    for rid, item in zip(rids, items, strict=True)
                ],
            )
            try:
                self._send_end.send(message)
            except (OSError, ValueError):  # the process just died: the reader fails them
                pass
        return [_RemoteRequest(self, rid) for rid in rids]

    def _cancel_many(self, handles) -> None:
        """One message cancels every request of a departed caller still held by the engine."""
        rids = [h.rid for h in handles if h.rid in self._pending]
        if rids:
            self._send(("cancel", rids))

    def prompt_logprobs(self, ids: Sequence[int], top: int = 0):
        """`InferenceService.prompt_logprobs`, run by the engine process (blocking)."""
        return self._call("prompt_logprobs", list(ids), top)

    def add_adapter(self, name: str, path: str) -> dict:
        """`Engine.add_adapter`, in the engine process; a process that replaces a dead one loads
        it too (it joins the spec's adapters)."""
        described = self._call("add_adapter", name, str(path))
        kept = tuple((n, p) for n, p in self.spec.adapters if n != name)
        self.spec = dataclasses.replace(self.spec, adapters=(*kept, (name, str(path))))
        return described

    def remove_adapter(self, name: str) -> None:
        self._call("remove_adapter", name)
        kept = tuple((n, p) for n, p in self.spec.adapters if n != name)
        self.spec = dataclasses.replace(self.spec, adapters=kept)

    def list_adapters(self) -> list[dict]:
        return self._call("list_adapters")

    def _call(self, name: str, *args):
        done: concurrent.futures.Future = concurrent.futures.Future()

        def settle(outcome) -> None:
            if isinstance(outcome, BaseException):
                done.set_exception(outcome)
            else:
                done.set_result(outcome)

        with self._lock:
            if self._state != "up":
                raise EngineStopped("the generation engine is not running")
            rid = next(self._ids)
            self._pending[rid] = Pending(None, None, settle)
            try:
                self._send_end.send(("call", rid, name, args))
            except (OSError, ValueError):
                pass
        return done.result()

    def _send(self, message: tuple) -> None:
        with self._lock:
            if self._send_end is None:
                return
            try:
                self._send_end.send(message)
            except (OSError, ValueError):  # the process has ended: the reader deals with it
                pass

    # -- the reader thread ----------------------------------------------------------------------
    def _read(self, worker: WorkerProcess) -> None:
        while True:
            try:
                while True:
                    self._handle(worker.receive_end.recv())
            except (EOFError, OSError):
                pass
            noticed = time.monotonic()
            worker.receive_end.close()
            end_process(worker.process, 5)
            if self._state in ("closing", "stopped"):
                return
            worker = self._replace(worker.process.returncode, noticed)
            if worker is None:
                return

    def _replace(self, exitcode, noticed: float) -> WorkerProcess | None:
        """The engine process died: fail what it held, then have the standby (or a new worker)
        load the model (None: give up)."""
        dead = self.pid
        log.error("engine process %s exited unexpectedly (code %s)", dead, exitcode)
        with self._lock:
            self._state = "restarting"
            self._running = 0
            if self._send_end is not None:
                self._send_end.close()
            self._send_end = None
        self._fail_pending(
            EngineDied(
                f"the engine process stopped unexpectedly (exit code {exitcode}) "
                "before this request finished; it is restarting: retry the request"
            )
        )
        failed = time.monotonic()
        if not self.restart:
            self._state = "failed"
            self._release_standby()
            return None
        for attempt in range(1, MAX_RESTARTS_IN_A_ROW + 1):
            if self._state != "restarting":  # stopped while it waited to try again
                return None
            try:
                standby = self.standby
                worker = self._load(standby.take() if standby is not None else WorkerProcess())
            except (EngineStartFailed, OSError) as e:
                log.error("engine restart %d failed: %s", attempt, e)
                time.sleep(min(2.0**attempt, 30.0))
                continue
            with self._lock:
                stopped = self._state != "restarting"
                if not stopped:
                    self._state = "up"
            if stopped:  # stopped meanwhile: the new process is not needed
                worker.end(0)
                return None
            self.restarts += 1
            self.observer.on_restart()
            self.phases = {"noticed": noticed, "failed": failed, **self.phases}
            log.warning(
                "engine process %d replaced %s in %.2f s (phases: %s)",
                self.pid,
                dead,
                self.phases["ready"] - noticed,
                " ".join(f"{k}={v:.3f}" for k, v in self.phases.items()),
            )
            if self.standby is not None:
                self.standby.refill()  # for the next crash, of this engine or another
            return worker
        self._state = "failed"
        self._release_standby()
        return None

    def _release_standby(self) -> None:
        with self._lock:
            held, self._holds_standby = self._holds_standby, False
        if held:
            self.standby.release()

    def _handle(self, message: tuple) -> None:
        if message[0] != "events":
            return
        _, running, events = message
        self._running = running
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        observer = self.observer
        for event in events:
            kind = event[0]
            if kind == TEXT or kind == DONE:
                rid, payload = event[1], event[2]
                p = self._pending.pop(rid, None) if kind == DONE else self._pending.get(rid)
                if p is None:
                    continue  # aborted or failed already
                fn = p.on_done if kind == DONE else p.on_text
                if p.loop is None:
                    fn(payload)
                else:
                    by_loop.setdefault(p.loop, []).append((fn, payload))
            elif kind == STEP:
                observer.on_step(event[1], event[2])
            elif kind == TOKENS:
                observer.on_tokens(event[1], event[2])
            elif kind == ADMITTED:
                observer.on_admitted(RequestInfo(event[1], prompt_tokens=event[2]))
            elif kind == FINISHED:
                observer.on_finished(RequestInfo(event[1], first_token_at=event[2]))
            elif kind == PREFIX:
                observer.on_prefix_cache(*event[1:])
        send_to_loops(by_loop)

    def _fail_pending(self, error: BaseException) -> None:
        with self._lock:
            pending, self._pending = self._pending, {}
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for p in pending.values():
            if p.loop is None:
                p.on_done(error)
            else:
                by_loop.setdefault(p.loop, []).append((p.on_done, error))
        send_to_loops(by_loop)


class _RemoteRequest:
    """What a `TokenStream` cancels: a request held by the engine process."""

    def __init__(self, engine: EngineProcess, rid: int):
        self._engine = engine
        self.rid = rid

    def cancel(self) -> None:
        self._engine._cancel_many([self])
