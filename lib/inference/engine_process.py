"""The generation engine in a process of its own, and the front-side client that drives it.

The front process (HTTP, validation, tokenisation, the response stream) and the engine process
(the continuous-batching loop of `engine.py` over the model) share no interpreter and no GIL: a
busy HTTP side no longer slows the decode steps down, and the engine's math has its cores to
itself. They talk over two one-way pipes (`multiprocessing.Pipe`, pickled tuples): the front sends
requests, cancellations and control messages; the engine sends, once per decode step, one message
with every piece of text, result and metric event of that step, and how many rows it runs.

`EngineProcess` (the front side) has the surface of `GenerationEngine` (`submit`, `submit_many`,
`stream`, `has_room`, `start`/`stop`/`abort`), so the routes cannot tell them apart:

- Backpressure is decided in the front without a round trip: it knows what it has sent and not
  seen finish, and the engine's last reported batch size; more than `max_queue` waiting is
  QueueFull at once.
- A caller that goes away (or a closed stream) sends a cancellation; the row leaves the batch at
  the next step.
- The model loads and warms up in the engine process; the front holds only the tokenizer and the
  model's shape (`FrontendInference`, weights on torch's meta device: no memory).
- An engine process that dies (killed, out of memory, a crash in native code) is noticed at once
  (its pipe closes): every request it held ends with `EngineDied` (never a hang), `alive` is false
  while a new process loads the same model, and `restarts` counts the restarts. `/ready` and
  `/metrics` read both.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path

import torch

from lib.inference.engine import (
    EngineObserver,
    EngineStopped,
    GenerationEngine,
    PreparedPrompt,
    QueueFull,
    TokenStream,
    TrackedQueue,
    _deliver,
    _settle,
)
from lib.inference.generation import GenerationParams, GenerationRequest, GenerationResult
from lib.inference.limits import ENGINE_MAX_BATCH_SIZE, ENGINE_MAX_QUEUE, ENGINE_MAX_WAIT_S
from lib.inference.onnx_model import onnx_model_file, resolve_backend
from lib.inference.service import InferenceService, checkpoint_sha256, served_directory

log = logging.getLogger(__name__)

# event kinds in the engine's per-step message
TEXT, DONE, ADMITTED, STEP, TOKENS, FINISHED = range(6)
START_TIMEOUT_S = 600.0  # loading a large checkpoint from a slow disk
MAX_RESTARTS_IN_A_ROW = 5  # a model that kills its process at once is not restarted forever


class EngineDied(RuntimeError):
    """The engine process ended while this request was queued or running (it is restarted)."""


class EngineRestarting(EngineStopped):
    """The engine process died and a new one is loading: come back shortly."""


class EngineStartFailed(RuntimeError):
    """The engine process could not load its model (the engine's log has the details)."""


@dataclass(frozen=True)
class EngineSpec:
    """What the engine process loads and how it batches (all picklable)."""

    checkpoint: str | None = None  # a checkpoint directory, or
    random_preset: str | None = None  # a randomly initialised preset (baseline only)
    device: str = "cpu"
    dtype: str = "float32"
    backend: str = "auto"  # torch or onnxruntime (lib/inference/onnx_model.py)
    precision: str = "fp32"  # the ONNX file the onnxruntime backend serves
    max_batch_size: int = ENGINE_MAX_BATCH_SIZE
    max_wait_s: float = ENGINE_MAX_WAIT_S
    threads: int | None = None  # the engine's math threads (default: all cores but one)
    warmup: bool = True


@dataclass(frozen=True)
class _RequestInfo:
    """What the metrics observer reads of a request (the engine process's timings)."""

    arrived_at: float
    prompt_tokens: int = 0
    first_token_at: float | None = None


@dataclass
class _Pending:
    loop: asyncio.AbstractEventLoop | None  # None: a blocking call (`prompt_logprobs`)
    on_text: Callable | None
    on_done: Callable


# -- the engine process ---------------------------------------------------------------------------
def load_engine_service(spec: EngineSpec) -> InferenceService:
    """The model as the engine process serves it (loaded with one thread: engine.py explains)."""
    torch.set_num_threads(1)
    if spec.random_preset:
        return InferenceService.random_baseline(spec.random_preset)
    return InferenceService.from_checkpoint(
        spec.checkpoint,
        device=spec.device,
        dtype=getattr(torch, spec.dtype),
        backend=spec.backend,
        precision=spec.precision,
        threads=spec.threads,
    )


class _ChannelOutbox:
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


class _ShippingObserver(EngineObserver):
    """Metric events, shipped to the front with the step's message."""

    def __init__(self, out: _ChannelOutbox):
        self.out = out

    def on_admitted(self, request: GenerationRequest) -> None:
        self.out.add((ADMITTED, request.arrived_at, request.prompt_tokens))

    def on_step(self, batch_size: int, seconds: float) -> None:
        self.out.add((STEP, batch_size, seconds))

    def on_tokens(self, count: int, gaps: list[float]) -> None:
        self.out.add((TOKENS, count, gaps))

    def on_finished(self, request: GenerationRequest) -> None:
        self.out.add((FINISHED, request.arrived_at, request.first_token_at))


def _engine_main(inbox: Connection, outbox: Connection) -> None:
    """The engine process: read its spec, load, warm up, say ready, then serve the front."""
    spec: EngineSpec = inbox.recv()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the front, which stops us
    logging.basicConfig(
        level=logging.INFO, format=f"%(asctime)s engine[{os.getpid()}] %(levelname)s %(message)s"
    )
    try:
        service = load_engine_service(spec)
        if spec.warmup:
            service.generate("Привет", GenerationParams(max_new_tokens=2, temperature=0))
    except Exception as e:
        log.exception("the engine process could not load its model")
        outbox.send(("failed", type(e).__name__))
        return
    out = _ChannelOutbox(outbox)
    engine = GenerationEngine(
        service.model,
        service.tokenizer,
        max_batch_size=spec.max_batch_size,
        max_wait_s=spec.max_wait_s,
        max_queue=1 << 30,  # the front decides what is queued
        lock=service._lock,
        observer=_ShippingObserver(out),
        threads=spec.threads,
        outbox=out,
    )
    out.running = lambda: engine.running
    engine.start()
    outbox.send(("ready", os.getpid()))
    requests: dict[int, GenerationRequest] = {}

    def finisher(rid: int) -> Callable:
        def done(outcome) -> None:
            requests.pop(rid, None)
            out.add((DONE, rid, outcome))

        return done

    while True:
        try:
            message = inbox.recv()
        except (EOFError, OSError):  # the front went away
            engine.abort(EngineStopped("the front process went away"))
            return
        kind = message[0]
        if kind == "add":
            batch = []
            for rid, ids, params, arrived_at, streamed in message[1]:
                on_text = (lambda piece, rid=rid: out.add((TEXT, rid, piece))) if streamed else None
                r = GenerationRequest(
                    ids, params, on_text=on_text, on_done=finisher(rid), arrived_at=arrived_at
                )
                requests[rid] = r
                batch.append(r)
            try:
                engine.enqueue(batch)
            except EngineStopped as e:
                for r in batch:
                    r.finish(e)
                out.flush()
        elif kind == "cancel":
            for rid in message[1]:
                if (r := requests.get(rid)) is not None:
                    r.cancel()
            engine.discard_cancelled()  # queued ones answer now: the front frees their places
        elif kind == "call":
            _, rid, name, args = message
            try:
                outcome = getattr(service, name)(*args)
            except Exception as e:
                outcome = e
            out.add((DONE, rid, outcome))
            out.flush()
        elif kind == "abort":
            engine.abort(message[1])
        elif kind == "stop":
            engine.stop(message[1])
            out.flush()
            return


# -- the front side -------------------------------------------------------------------------------
class EngineProcess(TrackedQueue):
    """`GenerationEngine`'s surface, with the engine in a child process (see the module doc)."""

    def __init__(
        self,
        spec: EngineSpec,
        *,
        max_queue: int = ENGINE_MAX_QUEUE,
        observer: EngineObserver | None = None,
        restart: bool = True,
        start_timeout_s: float = START_TIMEOUT_S,
    ):
        self.spec = spec
        self.max_queue = max_queue
        self.max_batch_size = spec.max_batch_size
        self.observer = observer or EngineObserver()
        self.restart = restart
        self.start_timeout_s = start_timeout_s
        self.restarts = 0  # how many times a dead engine process was replaced
        self.pid: int | None = None
        self._process = None
        self._send_end = None
        self._lock = threading.Lock()  # the send end, `_pending`, `_state`
        self._pending: dict[int, _Pending] = {}
        self._ids = itertools.count()
        self._running = 0  # rows in the engine's batch at its last step
        self._state = "stopped"  # starting | up | restarting | closing | stopped | failed
        self._reader: threading.Thread | None = None

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

    def _tracked(self) -> int:
        return len(self._pending)

    # -- life cycle -----------------------------------------------------------------------------
    def start(self) -> None:
        """Start the engine process and wait until its model is loaded and warmed up (blocking:
        call it off the event loop). EngineStartFailed when it cannot load."""
        if self._state != "stopped":
            return
        self._state = "starting"
        try:
            process, receive_end = self._spawn()
        except BaseException:
            self._state = "stopped"
            raise
        self._state = "up"
        self._reader = threading.Thread(
            target=self._read, args=(process, receive_end), name="engine-reader", daemon=True
        )
        self._reader.start()

    def _spawn(self):
        """Start an engine process (`python -m lib.inference.engine_process`, so nothing of the
        front's `__main__` is imported again) and wait for its "ready"."""
        requests_r, requests_w = os.pipe()
        events_r, events_w = os.pipe()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        process = subprocess.Popen(
            [sys.executable, "-m", __name__, str(requests_r), str(events_w)],
            pass_fds=(requests_r, events_w),
            env=env,
        )
        os.close(requests_r)  # the child's ends: closed here, so a dead child closes the pipe
        os.close(events_w)
        send_end = Connection(requests_w, readable=False)
        receive_end = Connection(events_r, writable=False)
        try:
            send_end.send(self.spec)
            deadline = time.monotonic() + self.start_timeout_s
            while not receive_end.poll(0.2):
                if process.poll() is not None:
                    raise EngineStartFailed(
                        f"the engine process exited with code {process.returncode} while loading"
                    )
                if time.monotonic() > deadline:
                    raise EngineStartFailed(
                        f"the engine process was not ready within {self.start_timeout_s:.0f} s"
                    )
            message = receive_end.recv()
        except (EOFError, OSError):
            message = ("failed", "its pipe closed")
        except BaseException:
            process.kill()
            raise
        if message[0] != "ready":
            _end(process, 5)
            send_end.close()
            receive_end.close()
            raise EngineStartFailed(f"the engine process could not load its model ({message[1]})")
        with self._lock:
            self._process, self._send_end, self.pid = process, send_end, process.pid
        log.info("engine process %d is ready", self.pid)
        return process, receive_end

    def stop(self, timeout: float = 30.0) -> None:
        """Take no new requests, let the engine finish the queued and running ones (up to
        `timeout`), then end its process."""
        with self._lock:
            if self._state in ("stopped", "failed"):
                return
            self._state = "closing"
            process = self._process
        self._send(("stop", timeout))
        if process is not None and not _end(process, timeout + 10):
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
    def _register(self, n: int, pendings: Sequence[_Pending], items, streamed: bool) -> list[int]:
        with self._lock:
            if self._state == "restarting":
                raise EngineRestarting("the engine process is restarting after a crash")
            if self._state != "up":
                raise EngineStopped("the generation engine is not running")
            if self.waiting + n > self.max_queue:
                raise QueueFull(
                    f"{self.waiting} requests are waiting (the limit is {self.max_queue})"
                )
            rids = [next(self._ids) for _ in range(n)]
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
        return rids

    async def submit(self, item: PreparedPrompt) -> GenerationResult:
        return (await self.submit_many([item]))[0]

    async def submit_many(self, items: Sequence[PreparedPrompt]) -> list[GenerationResult]:
        """Results for `items`, in order. Cancelling the caller cancels every one of them."""
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in items]
        pendings = [_Pending(loop, None, _settle(f)) for f in futures]
        rids = self._register(len(items), pendings, items, streamed=False)
        try:
            return list(await asyncio.gather(*futures))
        finally:
            self._cancel(rids)  # those still held by the engine (the caller went away)

    def stream(self, item: PreparedPrompt) -> TokenStream:
        """Queue `item` now (QueueFull/EngineStopped here, before any response starts); iterate
        the result for pieces of text, then the `GenerationResult`."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        (rid,) = self._register(
            1, [_Pending(loop, events.put_nowait, events.put_nowait)], [item], True
        )
        return TokenStream(_RemoteRequest(self, rid), events)

    def prompt_logprobs(self, ids: Sequence[int], top: int = 0):
        """`InferenceService.prompt_logprobs`, run by the engine process (blocking)."""
        return self._call("prompt_logprobs", list(ids), top)

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
            self._pending[rid] = _Pending(None, None, settle)
            try:
                self._send_end.send(("call", rid, name, args))
            except (OSError, ValueError):
                pass
        return done.result()

    def _cancel(self, rids: list[int]) -> None:
        rids = [r for r in rids if r in self._pending]
        if rids:
            self._send(("cancel", rids))

    def _send(self, message: tuple) -> None:
        with self._lock:
            if self._send_end is None:
                return
            try:
                self._send_end.send(message)
            except (OSError, ValueError):  # the process has ended: the reader deals with it
                pass

    # -- the reader thread ----------------------------------------------------------------------
    def _read(self, process, receive_end) -> None:
        while True:
            try:
                while True:
                    self._handle(receive_end.recv())
            except (EOFError, OSError):
                pass
            receive_end.close()
            _end(process, 5)
            if self._state in ("closing", "stopped"):
                return
            replacement = self._replace(process.returncode)
            if replacement is None:
                return
            process, receive_end = replacement

    def _replace(self, exitcode):
        """The engine process died: fail what it held, then start another (None: give up)."""
        log.error("engine process %s exited unexpectedly (code %s)", self.pid, exitcode)
        with self._lock:
            self._state = "restarting"
            self._running = 0
            self._send_end = None
        self._fail_pending(
            EngineDied(
                f"the engine process stopped unexpectedly (exit code {exitcode}) "
                "before this request finished; it is restarting: retry the request"
            )
        )
        if not self.restart:
            self._state = "failed"
            return None
        for attempt in range(1, MAX_RESTARTS_IN_A_ROW + 1):
            try:
                process, receive_end = self._spawn()
            except EngineStartFailed as e:
                log.error("engine restart %d failed: %s", attempt, e)
                time.sleep(min(2.0**attempt, 30.0))
                continue
            with self._lock:
                if self._state != "restarting":  # stopped meanwhile
                    process.kill()
                    return None
                self._state = "up"
            self.restarts += 1
            self.observer.on_restart()
            return process, receive_end
        self._state = "failed"
        return None

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
                observer.on_admitted(_RequestInfo(event[1], prompt_tokens=event[2]))
            elif kind == FINISHED:
                observer.on_finished(_RequestInfo(event[1], first_token_at=event[2]))
        for loop, calls in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, calls)
            except RuntimeError:  # that loop is closed: its callers are gone
                pass

    def _fail_pending(self, error: BaseException) -> None:
        with self._lock:
            pending, self._pending = self._pending, {}
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for p in pending.values():
            if p.loop is None:
                p.on_done(error)
            else:
                by_loop.setdefault(p.loop, []).append((p.on_done, error))
        for loop, calls in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, calls)
            except RuntimeError:
                pass


class _RemoteRequest:
    """What a `TokenStream` cancels: a request held by the engine process."""

    def __init__(self, engine: EngineProcess, rid: int):
        self._engine = engine
        self.rid = rid

    def cancel(self) -> None:
        self._engine._cancel([self.rid])


# -- the front's view of the model ----------------------------------------------------------------
class FrontendInference(InferenceService):
    """The front process's `InferenceService`: the tokenizer, the checkpoint's identity and the
    model's shape (its weights stay on torch's meta device: no memory), so `prepare`, limits and
    /metadata work here; what needs the weights (`prompt_logprobs`, `generate_prepared`) runs in
    the engine process, once `engine` is set."""

    def __init__(self, *args, spec: EngineSpec, **kwargs):
        super().__init__(*args, **kwargs)
        self.spec = spec
        self.engine = None  # an EngineProcess, or a VLLMEngine (the same surface)

    @classmethod
    def load(cls, spec: EngineSpec) -> FrontendInference:
        from transformers import AutoConfig, AutoModelForCausalLM

        from lib.config import DEFAULT_CHECKPOINT, get_preset
        from lib.modeling import build_model, read_card
        from lib.tokenizer import load_tokenizer

        dtype = getattr(torch, spec.dtype)
        if spec.random_preset:
            tokenizer = load_tokenizer(DEFAULT_CHECKPOINT)
            preset = get_preset(spec.random_preset)
            with torch.device("meta"):
                model = build_model(
                    preset,
                    vocab_size=max(len(tokenizer), preset.vocab_size),
                    eos_token_id=tokenizer.eos_token_id,
                )
            return cls(
                model.to(dtype),
                tokenizer,
                model_id=f"random-{spec.random_preset}",
                source=f"random:{spec.random_preset}",
                card={"preset": spec.random_preset},
                random_baseline=True,
                spec=spec,
            )
        path = Path(spec.checkpoint)
        served = served_directory(path, spec.backend, spec.device, dtype)
        if resolve_backend(path, spec.backend) == "onnxruntime":
            onnx_model_file(path, spec.precision)  # missing: the error here, before a process
        config = AutoConfig.from_pretrained(str(served))
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        card = read_card(served) or read_card(path)
        return cls(
            model.to(dtype),
            load_tokenizer(served),
            model_id=card.get("model_id") or path.name,
            source=str(path),
            card=card,
            checkpoint_sha256=checkpoint_sha256(served),
            spec=spec,
        )

    def runtime(self) -> dict:
        spec = self.spec
        if spec.random_preset or resolve_backend(spec.checkpoint, spec.backend) == "torch":
            return super().runtime()
        file = onnx_model_file(spec.checkpoint, spec.precision).name
        return {"backend": "onnxruntime", "precision": spec.precision, "model_file": file}

    @property
    def device(self) -> torch.device:
        return torch.device(self.spec.device)

    def _engine(self) -> EngineProcess:
        if self.engine is None:
            raise EngineStopped("the engine process has not been started")
        return self.engine

    def prompt_logprobs(self, ids: Sequence[int], top: int = 0):
        return self._engine().prompt_logprobs(ids, top)

    def generate_prepared(self, items: Sequence[PreparedPrompt]) -> list[GenerationResult]:
        """Run in the engine process (blocking: call it from a thread without an event loop)."""
        return asyncio.run(self._engine().submit_many(items))

    def generate_batch(self, prompts, params=None, should_stop=None) -> list[GenerationResult]:
        if params is None or isinstance(params, GenerationParams):
            params = [params or GenerationParams()] * len(prompts)
        return self.generate_prepared(
            [self.prepare(t, p) for t, p in zip(prompts, params, strict=True)]
        )

    def score(self, texts):
        raise NotImplementedError("scoring runs in-process (the score service), not here")


def _end(process: subprocess.Popen, timeout: float) -> bool:
    """Wait up to `timeout` for `process` to exit, else kill it; whether it exited by itself."""
    try:
        process.wait(timeout)
        return True
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        return False


if __name__ == "__main__":  # the engine process (EngineProcess._spawn)
    _engine_main(
        Connection(int(sys.argv[1]), writable=False), Connection(int(sys.argv[2]), readable=False)
    )
