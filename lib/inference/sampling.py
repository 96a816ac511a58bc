"""Next-token choice for a batch whose rows each carry their own sampling parameters.

Order of the warpers, as in `transformers`' `generate`: repetition penalty, then temperature, then
top-k, then top-p over what top-k kept. A greedy row (temperature 0) takes the arg-max of the
penalised logits. Each sampled row draws from its own `torch.Generator`, so its tokens do not depend
on the other rows of the batch: a row draws exactly one uniform number per token and inverts its
own distribution's CDF, so neither the company nor how many candidates the batch sorts changes
what it draws (`torch.multinomial` draws one number per candidate, so it would). The numbers come
from the row's own generator (`uniforms`, drawn by the caller).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch


@dataclass
class SamplingTensors:
    """Per-row parameters as (B, 1) tensors on the logits' device (built when the batch changes)."""

    temperature: torch.Tensor
    top_k: torch.Tensor  # 0 (disabled) is stored as the vocabulary size
    top_p: torch.Tensor
    penalty: torch.Tensor
    greedy: torch.Tensor  # (B,) bool
    k_max: int  # the largest top_k of the batch: only that many candidates are sorted
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
        return cls(
            temperature=temperature,
            top_k=column(top_k, torch.long),
            top_p=column([p.top_p for p in params]),
            penalty=column([p.repetition_penalty for p in params]),
            greedy=temperature[:, 0] <= 0,
            k_max=max(top_k),
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
    # the k_max best candidates of every row, best first: (B, k_max)
    if sp.k_max < logits.shape[-1]:
        top_logits, top_idx = logits.topk(sp.k_max, dim=-1)
    else:
        top_logits, top_idx = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(top_logits.shape[-1], device=logits.device)[None, :]
    scaled = (top_logits / sp.temperature.clamp(min=1e-5)).masked_fill(
        ranks >= sp.top_k, -torch.inf
    )
    probs = torch.softmax(scaled, dim=-1)
    probs = probs.masked_fill((probs.cumsum(-1) - probs) > sp.top_p, 0.0)  # keeps rank 0 always
    cdf = probs.cumsum(-1)  # (B, k)
    u = uniforms().to(cdf.device)  # (B,)
    choice = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None]).clamp(max=cdf.shape[-1] - 1)
    sampled = top_idx.gather(1, choice)[:, 0]
    if not sp.any_greedy:
        return sampled
    return torch.where(sp.greedy, logits.argmax(dim=-1), sampled)
