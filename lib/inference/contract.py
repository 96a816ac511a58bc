"""The engine contract: what every engine that runs a model for the server is, written once.

An engine takes preprocessed inputs (for text generation: `PreparedPrompt`s, token ids checked
against the model's context and vocabulary) from asyncio callers and gives their outputs back
(`submit`, `submit_many`) or, where it can, pieces of text as they are generated (`stream`). It has
a life cycle (`start`, `stop`, `abort`, `alive`, `restarts`), a bounded queue (`waiting`,
`running`, `has_room`; a full queue is `QueueFull` at once, never a wait) and says what it can do
(`capabilities`). The server and its metrics see engines only through this class, so an engine in
a thread of the server, in a process of its own, or vLLM's are interchangeable; the registry
(registry.py, `ENGINES`) names them for `ML_SERVICE_ENGINE`.

An engine implements `_enqueue`: queue items together (all or none), and deliver each one's
outcome to the caller's event loop. `submit`, `submit_many` and `stream` are built on it here, so
the asyncio side (futures, cancellation when the caller goes away, the token stream) is written
once. Model backends (torch, ONNX Runtime) are below engines: an engine runs a model through the
slot-decoder seam (decoder.py), and ONNX Runtime is one such model, not an engine.

The errors here are the engine-neutral ones: the HTTP error map knows only these (and the
`types.py` ones), whichever engine raised them. This module imports no torch.
"""

from __future__ import annotations

import asyncio
import contextlib
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

from lib.inference.types import GenerationResult, TokenLogprob


# -- engine-neutral errors ------------------------------------------------------------------------
class QueueFull(RuntimeError):
    """The engine's queue holds `max_queue` waiting requests: come back later."""


class EngineStopped(RuntimeError):
    """The engine is shutting down (or not started) and takes no new requests."""


class EngineRestarting(EngineStopped):
    """The engine died and a new one is loading: come back shortly."""


class EngineDied(RuntimeError):
    """The engine ended while this request was queued or running (it is being restarted)."""


class EngineStartFailed(RuntimeError):
    """The engine could not load its model (its log has the details)."""


class Unsupported(ValueError):
    """The engine cannot do what was asked (see its `capabilities`)."""


# -- what an engine says about itself -------------------------------------------------------------
@dataclass(frozen=True)
class EngineCapabilities:
    """What an engine supports, for the services and /metadata to read instead of probing it.

    `generates`: it takes `PreparedPrompt`s and gives `GenerationResult`s (a text-generation
    engine, selectable with ML_SERVICE_ENGINE); `stream`: pieces of text as they come;
    `prompt_logprobs`: a prompt's own token log-probabilities (OpenAI's `echo` with `logprobs`);
    `logprobs`: the generated tokens' log-probabilities; `seed`: a seeded request is reproducible;
    `restarts`: a dead engine is replaced by a new one; `loads_model`: the engine loads the
    weights itself (its own process, vLLM), so the server's process holds only the tokenizer and
    the model's shape; otherwise it runs the model the server's process loaded; `runs_backends`:
    it runs the model through our backends (torch, ONNX Runtime: ML_SERVICE_BACKEND), not a model
    runtime of its own (vLLM's); `adapters`: LoRA adapters, many in one batch (`add_adapter`)."""

    generates: bool = True
    stream: bool = True
    prompt_logprobs: bool = True
    logprobs: bool = True
    seed: bool = True
    restarts: bool = False
    loads_model: bool = False
    runs_backends: bool = True
    adapters: bool = False


class Cancellable(Protocol):
    def cancel(self) -> None: ...


class EngineObserver:
    """Hooks for metrics; called on the engine's thread (keep them quick). Defaults do nothing."""

    def on_admitted(self, request) -> None:
        """A request got its row (`request.arrived_at`, `request.prompt_tokens`)."""

    def on_step(self, batch_size: int, seconds: float) -> None: ...

    def on_tokens(self, count: int, gaps: list[float]) -> None: ...

    def on_finished(self, request) -> None:
        """A request ended (`request.arrived_at`, `request.first_token_at`)."""

    def on_restart(self) -> None:
        """The engine died and a new one took over."""

    def on_prefix_cache(
        self, prompt_tokens: int, cached_tokens: int, evictions: int, blocks: int
    ) -> None:
        """After an admission: its prompts' tokens and how many of them the prefix cache served,
        blocks evicted since the last call, blocks held now (lib/inference/prefix_cache.py)."""


# -- the contract ---------------------------------------------------------------------------------
class Engine(ABC):
    """One engine behind the server (see the module docstring). Subclasses set `capabilities`,
    `max_queue` and `observer`, and implement the abstract members; `create` builds one from an
    `EngineSpec` (registry.py) and what the server's process loaded."""

    capabilities: ClassVar[EngineCapabilities] = EngineCapabilities()
    # engines of one family give the same output for the same seeded or greedy request (the
    # response cache keys on it); by default each class is a family of its own
    family: ClassVar[str] = ""
    max_queue: int
    observer: EngineObserver
    restarts: int = 0  # how many times a dead engine was replaced (engines that restart count)

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if not cls.__dict__.get("family"):
            cls.family = f"{cls.__module__}.{cls.__qualname__}"

    @classmethod
    @abstractmethod
    def create(cls, spec, *, model: Any = None, observer: EngineObserver | None = None) -> Engine:
        """An engine for `spec` (an `EngineSpec`): `model` is what the server's process loaded
        for it (an `InferenceService` for an engine that runs the model there; a `predict`
        callable for the micro-batcher), None for one that `loads_model` itself."""

    # -- life cycle -----------------------------------------------------------------------------
    @abstractmethod
    def start(self) -> None:
        """Start taking requests (blocking while the model loads: call it off the event loop)."""

    @abstractmethod
    def stop(self, timeout: float = 30.0) -> None:
        """Take no new requests, finish the queued and running ones (up to `timeout`), end."""

    @abstractmethod
    def abort(self, error: BaseException) -> None:
        """End every queued and running request now with `error` and take no new ones
        (blocking; the app calls it, off the event loop, when a shutdown's grace is over)."""

    @property
    @abstractmethod
    def stopped(self) -> bool:
        """Whether it has ended (after `stop`), or never started."""

    @property
    def alive(self) -> bool:
        """Whether it takes requests now (an engine that restarts is not while it does)."""
        return not self.stopped

    # -- queue state ----------------------------------------------------------------------------
    @property
    @abstractmethod
    def running(self) -> int:
        """Requests being worked on now."""

    @property
    @abstractmethod
    def waiting(self) -> int:
        """Requests queued and not started."""

    def has_room(self, n: int = 1) -> bool:
        """Whether `n` more requests would be queued now (else `QueueFull`)."""
        return self.waiting + n <= self.max_queue

    def queue_full(self) -> QueueFull:
        return QueueFull(f"{self.waiting} requests are waiting (the limit is {self.max_queue})")

    # -- submitting -----------------------------------------------------------------------------
    @abstractmethod
    def _enqueue(
        self,
        items: Sequence[Any],
        loop: asyncio.AbstractEventLoop,
        delivers: Sequence[Callable[[Any], None]],
        streamed: bool,
    ) -> list[Cancellable]:
        """Queue `items` together, all or none (QueueFull, EngineStopped otherwise, raised here),
        and return one handle per item whose `cancel()` makes it leave the engine. Each item's
        `deliver` is called on `loop`: with each piece of text (str) when `streamed`, then once
        with its output or an exception."""

    def _cancel_many(self, handles: Sequence[Cancellable]) -> None:
        """Cancel the handles of requests whose caller went away (a no-op for finished ones)."""
        for h in handles:
            h.cancel()

    async def submit(self, item: Any) -> Any:
        return (await self.submit_many([item]))[0]

    async def submit_many(self, items: Sequence[Any]) -> list[Any]:
        """Outputs for `items`, in order; queued together, so they share batches. Cancelling the
        caller cancels every one of them."""
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in items]
        handles = self._enqueue(items, loop, [settler(f) for f in futures], streamed=False)
        try:
            return list(await asyncio.gather(*futures))
        finally:
            self._cancel_many(handles)  # a no-op for finished ones; the rest leave (client gone)

    def stream(self, item: Any) -> TokenStream:
        """Queue `item` now (QueueFull/EngineStopped are raised here, before any response
        starts); iterate the result for pieces of text, then the `GenerationResult`."""
        if not self.capabilities.stream:
            raise Unsupported(f"{type(self).__name__} does not stream")
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        (handle,) = self._enqueue([item], loop, [events.put_nowait], streamed=True)
        return TokenStream(handle, events)

    def prompt_logprobs(self, ids: Sequence[int], top: int = 0) -> list[TokenLogprob | None]:
        """A prompt's own token log-probabilities (ids without the leading end-of-document token;
        the first entry None), with `top` alternatives each. Blocking: call it off the event loop.
        The caller has checked the ids against the model's vocabulary and context."""
        raise Unsupported(f"{type(self).__name__} does not score prompts")

    # LoRA adapters (capabilities.adapters; lib/inference/adapters.py). Blocking: call them off
    # the event loop. A request names its adapter in `GenerationParams.adapter`.
    def add_adapter(self, name: str, path: str) -> dict:
        """Load the PEFT LoRA directory `path` as `name` (replacing an idle one of that name);
        its description. AdapterError with the reason when it cannot serve it."""
        raise Unsupported(f"{type(self).__name__} does not serve adapters")

    def remove_adapter(self, name: str) -> None:
        """Unload `name` once its running requests end; new ones are refused at once
        (AdapterNotFound when it is not loaded)."""
        raise Unsupported(f"{type(self).__name__} does not serve adapters")

    def list_adapters(self) -> list[dict]:
        """The loaded adapters (name, rank, sha256, bytes, running, removing)."""
        return []


class TokenStream:
    """Pieces of text (str) as they are generated, then the final `GenerationResult`.

    A reader that falls behind gets what piled up as one piece (so a busy server sends fewer,
    larger events instead of a backlog of one-token ones); the pieces always add up to the text.
    Closing it early (the client went away) cancels the sequence."""

    def __init__(self, request: Cancellable, events: asyncio.Queue):
        self.request = request
        self._events = events

    def __aiter__(self) -> AsyncIterator[str | GenerationResult]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[str | GenerationResult]:
        try:
            while True:
                event = await self._events.get()
                while isinstance(event, str) and not self._events.empty():
                    following = self._events.get_nowait()
                    if not isinstance(following, str):
                        yield event
                        event = following
                        break
                    event += following
                if isinstance(event, BaseException):
                    raise event
                yield event
                if isinstance(event, GenerationResult):
                    return
        finally:
            self.request.cancel()

    def cancel(self) -> None:
        self.request.cancel()

    def interrupt(self, error: BaseException) -> None:
        """End the stream now with `error` (call on its event loop); the sequence is cancelled."""
        self.request.cancel()
        self._events.put_nowait(error)


# -- delivering to event loops --------------------------------------------------------------------
def settler(fut: asyncio.Future) -> Callable[[Any], None]:
    """A `deliver` that settles `fut` with an output or an exception (call it on its loop)."""

    def settle(outcome) -> None:
        if fut.done():
            return
        if isinstance(outcome, BaseException):
            fut.set_exception(outcome)
        else:
            fut.set_result(outcome)

    return settle


def deliver_calls(calls: list) -> None:
    """Run (deliver, item) pairs: what one `call_soon_threadsafe` carries to a loop."""
    for fn, item in calls:
        fn(item)


def send_to_loops(by_loop: dict[asyncio.AbstractEventLoop, list]) -> None:
    """One `call_soon_threadsafe` per event loop with its (deliver, item) pairs, from any thread;
    a closed loop's callers are gone, so its pairs are dropped."""
    for loop, calls in by_loop.items():
        with contextlib.suppress(RuntimeError):  # that loop is closed
            loop.call_soon_threadsafe(deliver_calls, calls)
