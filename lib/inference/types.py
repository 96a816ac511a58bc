"""The public request and result types of generation, torch-free.

What a caller hands an engine (`GenerationParams`, a `PreparedPrompt`) and what it gets back
(`GenerationResult`, `TokenLogprob`), and the errors that say a request cannot be run as asked.
The HTTP layer's schemas build on these, so this module imports nothing heavier than the standard
library: importing `ml_service`'s schemas imports no torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

from lib.inference.constraints import Constraint

MAX_LOGPROBS = 20  # the most alternatives a row may ask for (OpenAI's top_logprobs limit)


class PromptTooLong(ValueError):
    """The prompt plus the requested new tokens do not fit in the model's context; `index` is the
    prompt's place in its batch."""

    def __init__(self, msg: str, index: int = 0):
        super().__init__(msg)
        self.index = index


class InvalidTokens(ValueError):
    """A token id outside the model's vocabulary [0, vocab_size), in a prompt given as ids or in a
    `logit_bias`; `index` is the prompt's place in its batch."""

    def __init__(self, msg: str, index: int = 0):
        super().__init__(msg)
        self.index = index


class GenerationFailed(RuntimeError):
    """The model raised while processing valid input."""


@dataclass(frozen=True)
class GenerationParams:
    """One row's decoding parameters. The defaults of the OpenAI-style fields (presence and
    frequency penalties, logit bias, ignore_eos, logprobs) change nothing and cost nothing.

    Order on a step's logits: the multiplicative repetition penalty (prompt and generated tokens),
    then `logit[t] += logit_bias[t] - presence_penalty * (count[t] > 0) - frequency_penalty *
    count[t]`, where count[t] is how often t occurs among the tokens GENERATED so far (not the
    prompt: vLLM's rule), then temperature, top-k, top-p. `logit_bias` is (token id, bias) pairs
    (a mapping is accepted too; an id given twice keeps its last bias); OpenAI's -100 effectively
    bans a token and +100 forces it. `ignore_eos`: the end-of-document token is never chosen (as
    before `min_new_tokens`). `logprobs` (0..MAX_LOGPROBS, None: not asked): the result carries
    each generated token's log-probability and that many best alternatives, from the model's RAW
    logits of that step (before penalties, bias, temperature and the end-of-document ban: vLLM's
    default). `constraint` (None: free text): the text must match it (a JSON schema, a regex, a
    choice, a grammar: `constraints.py`); the tokens it forbids are masked before everything above,
    the row ends with "stop" once its text is complete, and `min_new_tokens` and `ignore_eos` do
    not apply to it (the end of the document is allowed exactly when the grammar allows it)."""

    max_new_tokens: int = 64
    # the end-of-document token is forbidden before this many tokens (at most max_new_tokens):
    # a model trained on short texts often ends a continuation after its first short sentence
    min_new_tokens: int = 10
    temperature: float = 0.8  # 0 means greedy
    top_p: float = 0.95
    top_k: int = 50  # 0 disables
    repetition_penalty: float = 1.1
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    constraint: Constraint | None = None
    adapter: str | None = None  # a loaded LoRA adapter's name (adapters.py); None: the base model

    def __post_init__(self) -> None:
        if self.logit_bias:  # normalised: (int, float) pairs, one per token id
            pairs = (
                self.logit_bias.items() if isinstance(self.logit_bias, Mapping) else self.logit_bias
            )
            bias = {int(t): float(b) for t, b in pairs}
            object.__setattr__(self, "logit_bias", tuple(bias.items()))
        elif not isinstance(self.logit_bias, tuple):
            object.__setattr__(self, "logit_bias", ())
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise ValueError(f"logprobs must be within 0..{MAX_LOGPROBS}, not {self.logprobs}")


@dataclass
class TokenLogprob:
    """A token's natural-log probability under the model's raw logits, and the `top` most likely
    tokens of that position as (token id, logprob), best first (as many as were asked)."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class GenerationResult:
    """`token_ids`: the generated ids, without a final end-of-document token; `logprobs` (None
    unless the params asked; a request cancelled before it ever ran may carry None or [] even if it
    asked): one entry per id of `token_ids`, aligned with it. Both count every
    generated token, those whose text a stop string cut off included (`completion_tokens` does
    too), so `text` can be shorter than the decoded `token_ids`."""

    text: str
    finish_reason: str  # "length" | "stop" | "eos" | "cancelled"
    prompt_tokens: int
    completion_tokens: int
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    # of prompt_tokens, how many the prefix cache served (their KV copied, not computed:
    # OpenAI's usage.prompt_tokens_details.cached_tokens)
    cached_tokens: int = 0

    def to_dict(self) -> dict:
        """Plain data (JSON-ready): what a response cache stores."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> GenerationResult:
        logprobs = data.get("logprobs")
        return cls(
            text=data["text"],
            finish_reason=data["finish_reason"],
            prompt_tokens=data["prompt_tokens"],
            completion_tokens=data["completion_tokens"],
            token_ids=list(data["token_ids"]),
            logprobs=None
            if logprobs is None
            else [
                TokenLogprob(e["token_id"], e["logprob"], [tuple(t) for t in e["top"]])
                for e in logprobs
            ],
            cached_tokens=int(data.get("cached_tokens", 0)),
        )


@dataclass(frozen=True)
class PreparedPrompt:
    """A prompt ready for an engine: token ids (with the leading end-of-document token), params."""

    ids: list[int]
    params: GenerationParams
