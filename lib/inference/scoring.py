"""Score texts under a causal LM: per-token log-probabilities, log-likelihood, perplexity, bits/byte."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lib.inference.prompts import encode_prompts
from lib.inference.types import PromptTooLong, TokenLogprob
from lib.metrics import bits_per_byte


@dataclass
class TextScore:
    tokens: list[str]  # each token's text
    logprobs: list[float]  # natural-log probability of each token given everything before it
    num_bytes: int  # UTF-8 bytes of the text

    @property
    def log_likelihood(self) -> float:
        return sum(self.logprobs)

    @property
    def perplexity(self) -> float:
        return math.exp(-self.log_likelihood / max(len(self.logprobs), 1))

    @property
    def bits_per_byte(self) -> float:
        return bits_per_byte(-self.log_likelihood, self.num_bytes)


def check_scorable(tokenizer, texts: Sequence[str], context: int) -> list[list[int]]:
    """Token ids (behind a leading EOS) of each text, or PromptTooLong if one exceeds the context."""
    ids = encode_prompts(tokenizer, texts)
    check_scorable_ids(ids, context)
    return ids


def check_scorable_ids(ids: Sequence[list[int]], context: int) -> None:
    """PromptTooLong if a row of token ids (with its leading EOS) exceeds the context."""
    for i, row in enumerate(ids):
        if len(row) > context:
            raise PromptTooLong(
                f"{len(row) - 1} tokens exceed the context of {context - 1} scorable tokens",
                index=i,
            )


def _logprobs(model, ids: Sequence[list[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One forward pass over rows of token ids (each behind its leading EOS, which also pads them
    on the right): the log-softmax at every position (B, T, vocab) on the CPU, the input ids
    (B, T), and each token's log-probability given those before it (B, T-1)."""
    device = model.device
    B, T = len(ids), max(len(r) for r in ids)
    input_ids = torch.full((B, T), ids[0][0], dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.long)
    for i, row in enumerate(ids):  # right padding: positions start at 0 for every row
        input_ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits
    logp = torch.log_softmax(logits.float(), dim=-1).cpu()  # (B, T, vocab)
    target_logp = logp[:, :-1].gather(-1, input_ids[:, 1:, None]).squeeze(-1)  # (B, T-1)
    return logp, input_ids, target_logp


@torch.inference_mode()
def token_logprobs(model, ids: Sequence[list[int]], top: int = 0) -> list[list[TokenLogprob]]:
    """For each row of token ids (checked: `check_scorable_ids`), one `TokenLogprob` per token
    after the first (the leading EOS is context only), with its `top` best alternatives: the
    numbers `score_texts` gives."""
    logp, _, target_logp = _logprobs(model, ids)
    if top > 0:
        best = logp[:, :-1].topk(top, dim=-1)
        top_values, top_ids = best.values.tolist(), best.indices.tolist()
    out = []
    for i, row in enumerate(ids):
        values = target_logp[i, : len(row) - 1].tolist()
        out.append(
            [
                TokenLogprob(
                    t,
                    lp,
                    list(zip(top_ids[i][j], top_values[i][j], strict=True)) if top > 0 else [],
                )
                for j, (t, lp) in enumerate(zip(row[1:], values, strict=True))
            ]
        )
    return out


@torch.inference_mode()
def score_texts(model, tokenizer, texts: Sequence[str]) -> list[TextScore]:
    """Every token of every text is scored; the leading EOS (document start) is context only."""
    ids = check_scorable(tokenizer, texts, model.config.n_positions)
    _, _, target_logp = _logprobs(model, ids)
    out = []
    for i, row in enumerate(ids):
        n = len(row) - 1
        out.append(
            TextScore(
                tokens=[tokenizer.decode([t]) for t in row[1:]],
                logprobs=target_logp[i, :n].tolist(),
                num_bytes=len(texts[i].encode("utf-8")),
            )
        )
    return out
