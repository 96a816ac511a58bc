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

    @classmethod
    def build(cls, params: Sequence, vocab: int, device: torch.device) -> SamplingTensors:
        def column(values, dtype=torch.float32):
            return torch.tensor(values, dtype=dtype, device=device)[:, None]

        top_k = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
        temperature = column([p.temperature for p in params])
        return cls(
            temperature=temperature,
            top_k=column(top_k, torch.long),
            top_p=column([p.top_p for p in params]),
            penalty=column([p.repetition_penalty for p in params]),
            greedy=temperature[:, 0] <= 0,
            k_max=max(top_k),
        )


def sample_next(
    logits: torch.Tensor,
    seen: torch.Tensor,
    sp: SamplingTensors,
    uniforms: Callable[[], torch.Tensor],
) -> torch.Tensor:
    """One token id per row from logits (B, vocab); `seen` (B, vocab) marks tokens to penalise.
    `uniforms()` gives each row's next number in [0, 1) (B,); all-greedy batches never call it."""
    penalised = torch.where(logits > 0, logits / sp.penalty, logits * sp.penalty)
    logits = torch.where(seen & (sp.penalty != 1.0), penalised, logits)
    if bool(sp.greedy.all()):
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
    return torch.where(sp.greedy, logits.argmax(dim=-1), sampled)
