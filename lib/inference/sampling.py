"""Next-token choice for a batch whose rows each carry their own sampling parameters.

Order of the warpers, as in `transformers`' `generate`: repetition penalty, then temperature, then
top-k, then top-p over what top-k kept. Between the repetition penalty and temperature come the
OpenAI-style additive terms, as vLLM applies them: each row's logit bias, and its presence and
frequency penalties over the counts of the tokens it GENERATED (not its prompt); rows without them
are not touched, and a batch where no row has them skips them. A greedy row (temperature 0) takes
the arg-max of the penalised logits. Each sampled row draws from its own `torch.Generator`, so its
tokens do not depend on the other rows of the batch: a row draws exactly one uniform number per
token and inverts its own distribution's CDF, taken over its candidates from the most likely down,
so neither the company nor how many candidates the batch looks at changes what it draws
(`torch.multinomial` draws one number per candidate, so it would). The numbers come from the row's
own generator (`uniforms`, drawn by the caller).

Candidates, by row: a row with a small top-k (at most `NARROW_TOP_K`, the service's default 50
among them) takes them from `topk`. A wide row (a larger top-k, or none: top-p alone, or plain
sampling) needs its whole vocabulary in order. On the CPU that order comes from numpy's sort of the
values (vectorised, and far quicker than torch's CPU sort: BENCHMARKS.md, "Sampling"), and
the chosen value is then found back in the row; elsewhere from
`torch.sort`. Either way the row's draw is the same.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

NARROW_TOP_K = 64  # rows with top_k up to this take their candidates from topk, others sort
MIN_TEMPERATURE = 1e-5  # a smaller positive temperature samples as this one (0 is greedy)


@dataclass
class _Group:
    """Rows sampled together, with their parameters as (n, 1) tensors: narrow rows (candidates
    from `topk(k)`) or wide ones (the whole vocabulary sorted). Built with the batch."""

    rows: torch.Tensor | None  # their places in the batch; None: all of it
    wide: bool
    k: int  # narrow: the largest top_k of the group, the candidates `topk` returns
    temperature: torch.Tensor
    top_k: torch.Tensor  # 0 (disabled) is stored as the vocabulary size
    top_p: torch.Tensor
    limit_k: bool  # some row's top_k leaves out part of the candidates

    def sample(self, logits: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A token id per row of `logits` (this group's rows only), and whether each row's
        probabilities were finite (a row that is not gets a meaningless id: fail it)."""
        if not self.wide:
            top_logits, top_idx = logits.topk(self.k, dim=-1)
            rank, ok = _draw(top_logits, self, u)
            return top_idx.gather(1, rank[:, None])[:, 0], ok
        # wide: the values sorted (descending), a rank drawn, and that value found back in the row
        # (its first place there); numpy's sort on the CPU, where torch's is far slower
        if logits.device.type != "cpu":
            ordered = logits.sort(dim=-1, descending=True).values
            rank, ok = _draw(ordered, self, u)
            chosen = ordered.gather(1, rank[:, None])
            return (logits == chosen).int().argmax(dim=-1), ok
        values = logits.numpy()
        ordered = torch.from_numpy(-np.sort(-values, axis=-1))
        rank, ok = _draw(ordered, self, u)
        chosen = ordered.gather(1, rank[:, None])
        return torch.from_numpy(np.argmax(values == chosen.numpy(), axis=1)), ok


@dataclass
class SamplingTensors:
    """Per-row parameters on the logits' device (built when the batch changes)."""

    penalty: torch.Tensor  # (B, 1)
    greedy: torch.Tensor  # (B,) bool
    groups: list[_Group]  # the sampled rows: narrow ones, then wide ones (one group if all alike)
    any_greedy: bool
    all_greedy: bool
    any_penalty: bool  # some row's repetition penalty is not 1
    # the additive terms (all None when no row uses them: the default path skips them at once)
    bias: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # rows, ids, values (N,)
    count_rows: torch.Tensor | None = None  # rows with a presence/frequency penalty; None: all
    presence: torch.Tensor | None = None  # (P, 1) for those rows; None: no row has these penalties
    frequency: torch.Tensor | None = None  # (P, 1)
    # the rows that ask for log-probabilities (`rows.token_logprobs` computes them; None: none asks)
    logprob_rows: torch.Tensor | None = None  # their places in the batch
    logprob_places: list[int] | None = None  # the same, as a list
    logprob_all: bool = False  # every row asks
    logprob_top: list[int] | None = None  # alternatives each asks for
    logprob_k: int = 0  # the most any asks for

    @property
    def additive(self) -> bool:
        return self.bias is not None or self.presence is not None

    @property
    def any_counts(self) -> bool:
        """Some row has a presence or frequency penalty: `sample_next` needs `spans`."""
        return self.presence is not None

    @classmethod
    def build(cls, params: Sequence, vocab: int, device: torch.device) -> SamplingTensors:
        def column(values, dtype=torch.float32):
            return torch.tensor(values, dtype=dtype, device=device)[:, None]

        top_k = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
        greedy = [p.temperature <= 0 for p in params]
        # greedy rows need no candidates: they never make a batch sort
        wide = [k > NARROW_TOP_K and not g for k, g in zip(top_k, greedy, strict=True)]

        def group(places: list[int], is_wide: bool) -> _Group:
            ks = [top_k[i] for i in places]
            width = vocab if is_wide else max([k for k in ks if k <= NARROW_TOP_K], default=1)
            return _Group(
                rows=None if len(places) == len(params) else torch.tensor(places, device=device),
                wide=is_wide,
                k=width,
                temperature=column([params[i].temperature for i in places]),
                top_k=column(ks, torch.long),
                top_p=column([params[i].top_p for i in places]),
                limit_k=min(ks) < width,
            )

        split = {w: [i for i, x in enumerate(wide) if x == w] for w in (False, True)}
        sp = cls(
            penalty=column([p.repetition_penalty for p in params]),
            greedy=torch.tensor(greedy, device=device),
            groups=[group(places, w) for w, places in split.items() if places],
            any_greedy=any(greedy),
            all_greedy=all(greedy),
            any_penalty=any(p.repetition_penalty != 1.0 for p in params),
        )
        bias = [(i, t, b) for i, p in enumerate(params) for t, b in getattr(p, "logit_bias", ())]
        if bias:
            rows, ids, values = zip(*bias, strict=True)
            if not all(0 <= t < vocab for t in ids):  # InvalidTokens, earlier, in the service
                raise ValueError(f"a logit_bias token id is outside the vocabulary [0, {vocab})")
            sp.bias = (
                torch.tensor(rows, device=device),
                torch.tensor(ids, device=device),
                torch.tensor(values, dtype=torch.float32, device=device),
            )
        counted = [
            i
            for i, p in enumerate(params)
            if getattr(p, "presence_penalty", 0.0) or getattr(p, "frequency_penalty", 0.0)
        ]
        if counted:
            if len(counted) < len(params):
                sp.count_rows = torch.tensor(counted, device=device)
            sp.presence = column([params[i].presence_penalty for i in counted])
            sp.frequency = column([params[i].frequency_penalty for i in counted])
        asking = [i for i, p in enumerate(params) if getattr(p, "logprobs", None) is not None]
        if asking:
            sp.logprob_rows = torch.tensor(asking, device=device)
            sp.logprob_places = asking
            sp.logprob_all = len(asking) == len(params)
            sp.logprob_top = [params[i].logprobs for i in asking]
            sp.logprob_k = min(max(sp.logprob_top), vocab)
        return sp


def sample_next(
    logits: torch.Tensor,
    history: torch.Tensor,
    sp: SamplingTensors,
    uniforms: Callable[[], torch.Tensor],
    spans: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token id per row from logits (B, vocab), which it penalises in place, and a (B,) bool
    that marks the rows whose logits or probabilities were not finite (NaN, or an infinity that a
    warper made): their ids mean nothing, and the caller fails those rows alone. It never raises
    for such a row, so one row's numbers cannot fail its batch.

    `history` (B, T) holds the token ids each row has seen (its prompt and what it generated),
    padded with any of them: the repetition penalty touches those logits only (a gather and a
    scatter of B x T values, not passes over B x vocab). `uniforms()` gives each row's next number
    in [0, 1) (B,); all-greedy batches never call it.

    `spans` (B, 2), needed only when some row has a presence or frequency penalty: the columns
    [start, end) of `history` that hold each row's generated tokens (what those penalties count).
    """
    if sp.any_penalty:
        seen = logits.gather(1, history)
        seen = torch.where(seen > 0, seen / sp.penalty, seen * sp.penalty)
        logits.scatter_(1, history, seen)  # a repeated id writes the same value again
    if sp.additive:
        _add_bias_and_penalties(logits, history, sp, spans)
    if sp.all_greedy:
        best = logits.max(dim=-1)  # NaN wins max, so a NaN row shows in its value
        return best.indices, ~best.values.isfinite()
    u = uniforms().to(logits.device)  # (B,)
    if sp.groups[0].rows is None:  # the usual case: every row alike
        sampled, ok = sp.groups[0].sample(logits, u)
    else:
        sampled = torch.empty(logits.shape[0], dtype=torch.long, device=logits.device)
        ok = torch.empty(logits.shape[0], dtype=torch.bool, device=logits.device)
        for g in sp.groups:
            sampled[g.rows], ok[g.rows] = g.sample(logits[g.rows], u[g.rows])
    if not sp.any_greedy:
        return sampled, ~ok
    best = logits.max(dim=-1)
    return (
        torch.where(sp.greedy, best.indices, sampled),
        torch.where(sp.greedy, ~best.values.isfinite(), ~ok),
    )


def _generated(
    history: torch.Tensor, spans: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """Each row's generated ids, from columns [start, end) of `history` (B, T), as (B, G) (G the
    longest span) with each row's count n (B, 1); a row's places past its span repeat its last
    id (a row without any repeats a column of no importance). None when no row generated any."""
    start, n = spans[:, :1], spans[:, 1:] - spans[:, :1]
    width = int(n.max()) if n.numel() else 0
    if width == 0:
        return None
    offsets = torch.arange(width, device=history.device)[None, :]
    cols = (start + torch.minimum(offsets, (n - 1).clamp(min=0))).clamp(max=history.shape[1] - 1)
    return history.gather(1, cols), offsets < n, n


def generated_counts(history: torch.Tensor, spans: torch.Tensor, vocab: int) -> torch.Tensor:
    """(B, vocab) float32: how often each token occurs in columns [start, end) of each row of
    `history` (B, T), the row's generated tokens; one scatter_add of B x (longest span) values."""
    counts = torch.zeros((history.shape[0], vocab), device=history.device)
    generated = _generated(history, spans)
    if generated is None:
        return counts
    ids, valid, _ = generated
    return counts.scatter_add_(1, ids, valid.float())


def _add_bias_and_penalties(
    logits: torch.Tensor, history: torch.Tensor, sp: SamplingTensors, spans: torch.Tensor | None
) -> None:
    """In place: logit += bias - presence * (count > 0) - frequency * count, for the rows that
    have them (the others are not touched). The penalties touch the generated ids only (gathers
    and scatters of B x G values, as the repetition penalty; only the counts are B x vocab)."""
    if sp.bias is not None:
        rows, ids, values = sp.bias
        logits.index_put_((rows, ids), values.to(logits.dtype), accumulate=True)
    if sp.presence is None:
        return
    if spans is None:
        raise ValueError("presence/frequency penalties need `spans`: the generated tokens' columns")
    spans = spans.to(history.device)
    rows = sp.count_rows
    if rows is not None:
        history, spans = history[rows], spans[rows]
    generated = _generated(history, spans)
    if generated is None:  # nothing generated yet (a prompt's first token)
        return
    ids, valid, n = generated
    counts = torch.zeros((ids.shape[0], logits.shape[-1]), device=ids.device)
    counts = counts.scatter_add_(1, ids, valid.float()).gather(1, ids)  # each id's count, >= 1
    # presence * (count > 0) + frequency * count; nothing for a row that generated nothing
    # (its places all repeat one column); an id seen twice gets the same value twice
    penalty = ((sp.presence + sp.frequency * counts) * (n > 0)).to(logits.dtype)
    if rows is None:
        logits.scatter_(1, ids, logits.gather(1, ids) - penalty)
    else:
        places = (rows[:, None].expand_as(ids), ids)
        logits.index_put_(places, logits[places] - penalty)


def _draw(ordered: torch.Tensor, g: _Group, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The rank each row draws from its candidates' logits, best first (n, C): temperature, then
    top-k (ranks from top_k on are out), then top-p (a rank stays while the mass before it is at
    most top_p, so rank 0 always does); u (n,) inverts the CDF of what is left: the first rank
    whose cumulative mass reaches u times the mass kept. Also (n,) bool: the row's probabilities
    were finite (a NaN or +inf logit makes the whole row's softmax NaN, and its total mass shows
    it)."""
    scaled = ordered / g.temperature.clamp(min=MIN_TEMPERATURE)
    if g.limit_k:
        ranks = torch.arange(ordered.shape[-1], device=ordered.device)[None, :]
        scaled = scaled.masked_fill(ranks >= g.top_k, -torch.inf)
    probs = torch.softmax(scaled, dim=-1)
    cdf = probs.cumsum(-1)  # (n, C)
    ok = cdf[:, -1].isfinite()
    # a prefix of the ranks, at least 1 (a NaN row would keep none: it gets rank 0 and fails)
    kept = ((cdf - probs) <= g.top_p).sum(-1, keepdim=True).clamp(min=1)
    choice = torch.searchsorted(cdf, u[:, None] * cdf.gather(1, kept - 1))
    return choice[:, 0].clamp(max=cdf.shape[-1] - 1), ok
