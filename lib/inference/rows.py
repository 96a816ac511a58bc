"""One sequence as the batch sees it: `GenerationRequest` (what a caller asks, and how it is told
the outcome) and `Row` (its state while it runs in a `DecodeBatch`: tokens, text decoded so far,
random numbers, grammar place), plus the small pieces of a step that read one row's numbers."""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from lib.inference.constraints import RowMatcher
from lib.inference.sampling import SamplingTensors
from lib.inference.types import GenerationParams, GenerationResult, TokenLogprob


@dataclass(eq=False)
class GenerationRequest:
    """One sequence to generate. Callbacks run on the decoding thread and must be quick."""

    prompt_ids: list[int]  # with the leading end-of-document token (see encode_prompts)
    params: GenerationParams
    on_text: Callable[[str], None] | None = None  # each new piece of text, in order
    on_done: Callable[[GenerationResult | BaseException], None] | None = None
    cancelled: bool = False  # set from any thread: the row leaves the batch at the next step
    arrived_at: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    result: GenerationResult | None = None
    error: BaseException | None = None

    def cancel(self) -> None:
        self.cancelled = True

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids) - 1

    def finish(self, outcome: GenerationResult | BaseException) -> None:
        if isinstance(outcome, BaseException):
            self.error = outcome
        else:
            self.result = outcome
        if self.on_done is not None:
            self.on_done(outcome)

    @property
    def done(self) -> bool:
        return self.result is not None or self.error is not None


class Row:
    """A running sequence: its tokens, its incrementally decoded text and its generator."""

    def __init__(self, request: GenerationRequest):
        self.request = request
        self.params = request.params
        seed = self.params.seed if self.params.seed is not None else secrets.randbits(63)
        self.generator = torch.Generator().manual_seed(seed)  # on the CPU: 64 numbers a draw
        self._uniforms: list[float] = []
        self.generated: list[int] = []
        self.text = ""  # decoded so far, without a trailing incomplete character
        self.prefix_offset = 0  # incremental detokenisation window (see DecodeBatch._detokenize)
        self.read_offset = 0
        self.emitted = 0  # characters of `text` handed to on_text
        self.hold_back = max((len(s) for s in self.params.stop), default=1) - 1
        self.finish_reason: str | None = None  # "failed": see `failure`
        self.logprobs: list[TokenLogprob] | None = [] if self.params.logprobs is not None else None
        self.failure: BaseException | None = None
        self.last_token_at = 0.0
        self.cached_tokens = 0  # of its prompt, served by the prefix cache (prefix_cache.py)
        # structured outputs: the row's place in its grammar (made at its first choice), and
        # whether its text is complete (it ended because the grammar allows nothing more)
        self.matcher: RowMatcher | None = None
        self.complete = False

    def peek_uniform(self) -> float:
        """The row's next random number in [0, 1), drawn 64 at a time from its own generator;
        `use_uniform` moves past it once the token it chose is kept (so a step that is retried
        draws the same numbers again)."""
        if not self._uniforms:
            self._uniforms = torch.rand(64, generator=self.generator).tolist()[::-1]
        return self._uniforms[-1]

    def use_uniform(self) -> None:
        self._uniforms.pop()

    def fail(self, error: BaseException) -> None:
        self.finish_reason, self.failure = "failed", error

    @property
    def position(self) -> int:
        """Cache position of the newest token (the one the next decode step feeds)."""
        return len(self.request.prompt_ids) + len(self.generated) - 1


def token_logprobs(
    raw: torch.Tensor, tokens: torch.Tensor, sampling: SamplingTensors
) -> dict[int, TokenLogprob]:
    """The chosen token's log-probability and the best alternatives of each asking row, by its
    place in the batch; `raw` holds those rows' log_softmax of the raw logits (n, vocab)."""
    places = sampling.logprob_places
    chosen = tokens if sampling.logprob_all else tokens[sampling.logprob_rows]
    values = raw.gather(1, chosen[:, None])[:, 0].tolist()
    ids = chosen.tolist()
    if sampling.logprob_k > 0:
        top = raw.topk(sampling.logprob_k, dim=-1)
        top_values, top_ids = top.values.tolist(), top.indices.tolist()
    else:
        top_values = top_ids = [[] for _ in places]
    out = {}
    for j, (place, k) in enumerate(zip(places, sampling.logprob_top, strict=True)):
        pairs = list(zip(top_ids[j][:k], top_values[j][:k], strict=True))
        out[place] = TokenLogprob(ids[j], values[j], pairs)
    return out


def first_stop(text: str, stops: Sequence[str]) -> int | None:
    hits = [text.find(s) for s in stops if s and s in text]
    return min(hits) if hits else None
