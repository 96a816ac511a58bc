"""Next-token choice for a batch whose rows each carry their own sampling parameters.

Order of the warpers, as in `transformers`' `generate`: repetition penalty, then temperature, then
top-k, then top-p over what top-k kept. A greedy row (temperature 0) takes the arg-max of the
penalised logits. Each sampled row draws from its own `torch.Generator`, so its tokens do not depend
on the other rows of the batch: a row draws exactly one uniform number per token and inverts its
own distribution's CDF, taken over its candidates from the most likely down, so neither the company
nor how many candidates the batch looks at changes what it draws (`torch.multinomial` draws one
number per candidate, so it would). The numbers come from the row's own generator (`uniforms`,
drawn by the caller).

Candidates, by row: a row with a small top-k (at most `NARROW_TOP_K`, the service's default 50
among them) takes them from `topk`. A wide row (a larger top-k, or none: top-p alone, or plain
sampling) needs its whole vocabulary in order. On the CPU that order comes from numpy's sort of the
values (vectorised; torch's CPU sort of a 16 x 8,192 batch took 6.5 ms here, numpy's 0.2 ms), and
the chosen value is then found back in the row (BENCHMARKS.md, "Sampling"); elsewhere from
`torch.sort`. Either way the row's draw is the same.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch

NARROW_TOP_K = 64  # rows with top_k up to this take their candidates from topk, others sort


@dataclass
class SamplingTensors:
    """Per-row parameters as (B, 1) tensors on the logits' device (built when the batch changes)."""

    temperature: torch.Tensor
    top_k: torch.Tensor  # 0 (disabled) is stored as the vocabulary size
    top_p: torch.Tensor
    penalty: torch.Tensor
    greedy: torch.Tensor  # (B,) bool
    k_max: int  # the largest top_k of the narrow rows: only that many candidates are sorted
    wide: torch.Tensor | None  # (B,) bool, rows whose candidates are the whole sorted vocabulary
    any_greedy: bool
    all_greedy: bool
    any_penalty: bool  # some row's repetition penalty is not 1

    @classmethod
    def build(cls, params: Sequence, vocab: int, device: torch.device) -> SamplingTensors:
        def column(values, dtype=torch.float32):
            return torch.tensor(values, dtype=dtype, device=device)[:, None]

        top_k = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
        temperature = column([p.temperature for p in params])
        greedy = [p.temperature <= 0 for p in params]
        # greedy rows need no candidates: they never make a batch sort
        wide = [k > NARROW_TOP_K and not g for k, g in zip(top_k, greedy, strict=True)]
        narrow_k = [k for k in top_k if k <= NARROW_TOP_K]
        return cls(
            temperature=temperature,
            top_k=column(top_k, torch.long),
            top_p=column([p.top_p for p in params]),
            penalty=column([p.repetition_penalty for p in params]),
            greedy=temperature[:, 0] <= 0,
            k_max=max(narrow_k, default=1),
            wide=torch.tensor(wide, device=device) if any(wide) else None,
            any_greedy=any(greedy),
            all_greedy=all(greedy),
            any_penalty=any(p.repetition_penalty != 1.0 for p in params),
        )


def sample_next(
    logits: torch.Tensor,
    history: torch.Tensor,
    sp: SamplingTensors,
    uniforms: Callable[[], torch.Tensor],
) -> torch.Tensor:
    """One token id per row from logits (B, vocab), which it penalises in place.

    `history` (B, T) holds the token ids each row has seen (its prompt and what it generated),
    padded with any of them: the repetition penalty touches those logits only (a gather and a
    scatter of B x T values, not passes over B x vocab). `uniforms()` gives each row's next number
    in [0, 1) (B,); all-greedy batches never call it."""
    if sp.any_penalty:
        seen = logits.gather(1, history)
        seen = torch.where(seen > 0, seen / sp.penalty, seen * sp.penalty)
        logits.scatter_(1, history, seen)  # a repeated id writes the same value again
    if sp.all_greedy:
        return logits.argmax(dim=-1)
    u = uniforms().to(logits.device)  # (B,)
    if sp.wide is None:  # the usual case: every row narrow
        sampled = _sample_narrow(logits, sp.k_max, sp.temperature, sp.top_k, sp.top_p, u)
    else:
        sampled = torch.empty(logits.shape[0], dtype=torch.long, device=logits.device)
        for sample, rows in (
            (partial(_sample_narrow, k=sp.k_max), (~sp.wide).nonzero()[:, 0]),
            (_sample_wide, sp.wide.nonzero()[:, 0]),
        ):
            if len(rows):
                sampled[rows] = sample(
                    logits[rows],
                    temperature=sp.temperature[rows],
                    top_k=sp.top_k[rows],
                    top_p=sp.top_p[rows],
                    u=u[rows],
                )
    if not sp.any_greedy:
        return sampled
    return torch.where(sp.greedy, logits.argmax(dim=-1), sampled)


def _sample_narrow(logits, k, temperature, top_k, top_p, u) -> torch.Tensor:
    """Rows whose top_k is at most k: their k best candidates come from `topk`."""
    top_logits, top_idx = logits.topk(k, dim=-1)
    rank = _draw(top_logits, temperature, top_k, top_p, u)
    return top_idx.gather(1, rank[:, None])[:, 0]


def _sample_wide(logits, temperature, top_k, top_p, u) -> torch.Tensor:
    """Rows that need their whole vocabulary in order: the values sorted (descending), the rank
    drawn, and that value found back in the row (its first place there)."""
    limit_k = bool((top_k < logits.shape[-1]).any())
    if logits.device.type != "cpu":
        ordered = logits.sort(dim=-1, descending=True).values
        rank = _draw(ordered, temperature, top_k, top_p, u, limit_k)
        return (logits == ordered.gather(1, rank[:, None])).to(torch.uint8).argmax(dim=-1)
    values = logits.numpy()
    ordered = torch.from_numpy(-np.sort(-values, axis=-1))
    chosen = ordered.gather(1, _draw(ordered, temperature, top_k, top_p, u, limit_k)[:, None])
    return torch.from_numpy(np.argmax(values == chosen.numpy(), axis=1))


def _draw(ordered, temperature, top_k, top_p, u, limit_k: bool = True) -> torch.Tensor:
    """The rank each row draws from its candidates' logits, best first (B, C): temperature, then
    top-k (ranks from top_k on are out; `limit_k` False says no row's top_k is below C), then
    top-p (a rank stays while the mass before it is at most top_p, so rank 0 always does); u (B,)
    inverts the CDF of what is left: the first rank whose cumulative mass reaches u times the
    mass kept."""
    scaled = ordered / temperature.clamp(min=1e-5)
    if limit_k:
        ranks = torch.arange(ordered.shape[-1], device=ordered.device)[None, :]
        scaled = scaled.masked_fill(ranks >= top_k, -torch.inf)
    probs = torch.softmax(scaled, dim=-1)
    cdf = probs.cumsum(-1)  # (B, C)
    kept = ((cdf - probs) <= top_p).sum(-1, keepdim=True)  # a prefix of the ranks, at least 1
    choice = torch.searchsorted(cdf, u[:, None] * cdf.gather(1, kept - 1))
    return choice[:, 0].clamp(max=cdf.shape[-1] - 1)
