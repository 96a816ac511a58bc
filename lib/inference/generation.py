"""Batched autoregressive decoding with a KV cache and per-row sampling parameters.

Every row of a batch carries its own temperature, top-k, top-p, repetition penalty, seed, stop
strings and token budget, and samples with its own `torch.Generator`, so a seeded or greedy request
gives the same text alone or in a batch. Prompts are left-padded; position ids skip the padding.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch


class PromptTooLong(ValueError):
    """The prompt plus the requested new tokens do not fit in the model's context."""


class GenerationFailed(RuntimeError):
    """The model raised while processing valid input."""


@dataclass(frozen=True)
class GenerationParams:
    max_new_tokens: int = 64
    min_new_tokens: int = 0  # the end-of-document token is forbidden before this many tokens
    temperature: float = 0.8  # 0 means greedy
    top_p: float = 0.95
    top_k: int = 50  # 0 disables
    repetition_penalty: float = 1.1
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)


@dataclass
class GenerationResult:
    text: str
    finish_reason: str  # "length" | "stop" | "eos" | "cancelled"
    prompt_tokens: int
    completion_tokens: int


def encode_prompts(tokenizer, prompts: Sequence[str]) -> list[list[int]]:
    """Token ids of each prompt behind a leading EOS, which marks a document start in training."""
    return [[tokenizer.eos_token_id] + ids for ids in tokenizer(list(prompts))["input_ids"]]


def check_fits(
    prompt_ids: Sequence[list[int]], params: Sequence[GenerationParams], context: int
) -> None:
    for i, (ids, p) in enumerate(zip(prompt_ids, params, strict=True)):
        if len(ids) + p.max_new_tokens > context:
            raise PromptTooLong(
                f"text {i}: prompt of {len(ids) - 1} tokens + max_new_tokens {p.max_new_tokens} "
                f"exceeds the context of {context} tokens (the service never truncates silently)"
            )


@torch.inference_mode()
def generate(
    model,
    tokenizer,
    prompts: Sequence[str],
    params: Sequence[GenerationParams],
    should_stop: Callable[[], bool] | None = None,
) -> list[GenerationResult]:
    """Generate a continuation for every prompt, each row with its own parameters."""
    if not prompts:
        return []
    prompt_ids = encode_prompts(tokenizer, prompts)
    check_fits(prompt_ids, params, model.config.n_positions)
    device = next(model.parameters()).device
    B, eos = len(prompts), tokenizer.eos_token_id
    vocab = model.config.vocab_size

    # left-pad: (B, T) ids, mask and positions that ignore the padding
    T = max(len(ids) for ids in prompt_ids)
    input_ids = torch.full((B, T), eos, dtype=torch.long)
    attention = torch.zeros((B, T), dtype=torch.long)
    for i, ids in enumerate(prompt_ids):
        input_ids[i, T - len(ids) :] = torch.tensor(ids)
        attention[i, T - len(ids) :] = 1
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    seen = torch.zeros(
        (B, vocab), dtype=torch.bool
    )  # tokens each row has seen (repetition penalty)
    for i, ids in enumerate(prompt_ids):
        seen[i, ids] = True

    temperature = torch.tensor([p.temperature for p in params], dtype=torch.float32)[:, None]
    top_k = torch.tensor([p.top_k if p.top_k > 0 else vocab for p in params])[:, None]
    top_p = torch.tensor([p.top_p for p in params], dtype=torch.float32)[:, None]
    penalty = torch.tensor([p.repetition_penalty for p in params], dtype=torch.float32)[:, None]
    greedy = temperature[:, 0] <= 0
    generators = [
        torch.Generator().manual_seed(p.seed if p.seed is not None else secrets.randbits(63))
        for p in params
    ]
    budgets = [p.max_new_tokens for p in params]

    generated: list[list[int]] = [[] for _ in range(B)]
    finish: list[str | None] = [None] * B
    texts = [""] * B
    past = None
    step_ids, step_mask, step_pos = input_ids, attention, positions
    for _ in range(max(budgets)):
        if should_stop is not None and should_stop():
            for i in range(B):
                finish[i] = finish[i] or "cancelled"
            break
        out = model(
            input_ids=step_ids.to(device),
            attention_mask=step_mask.to(device),
            position_ids=step_pos.to(device),
            past_key_values=past,
            use_cache=True,
        )
        past = out.past_key_values
        logits = out.logits[:, -1, :].float().cpu()  # (B, vocab)
        for i, p in enumerate(params):
            if len(generated[i]) < p.min_new_tokens:
                logits[i, eos] = float("-inf")
        next_ids = sample_next(logits, seen, temperature, top_k, top_p, penalty, greedy, generators)

        for i in range(B):
            if finish[i] is not None:
                continue
            tok = int(next_ids[i])
            if tok == eos:
                finish[i] = "eos"
                continue
            generated[i].append(tok)
            seen[i, tok] = True
            texts[i] = tokenizer.decode(generated[i], skip_special_tokens=True)
            cut = _first_stop(texts[i], params[i].stop)
            if cut is not None:
                texts[i], finish[i] = texts[i][:cut], "stop"
            elif len(generated[i]) >= budgets[i]:
                finish[i] = "length"
        if all(f is not None for f in finish):
            break
        step_ids = next_ids[:, None]
        step_mask = torch.cat([step_mask, torch.ones((B, 1), dtype=torch.long)], dim=1)
        step_pos = step_pos[:, -1:] + 1

    return [
        GenerationResult(texts[i], finish[i] or "length", len(prompt_ids[i]) - 1, len(generated[i]))
        for i in range(B)
    ]


def sample_next(
    logits: torch.Tensor,
    seen: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    penalty: torch.Tensor,
    greedy: torch.Tensor,
    generators: list[torch.Generator],
) -> torch.Tensor:
    """One token per row from logits (B, vocab), each row with its own parameters and generator."""
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    logits = torch.where(seen & (penalty != 1.0), penalised, logits)
    next_ids = logits.argmax(dim=-1)
    if greedy.all():
        return next_ids
    sorted_logits, sorted_idx = logits.sort(dim=-1, descending=True)  # (B, vocab)
    ranks = torch.arange(logits.shape[-1])[None, :]
    probs = torch.softmax(sorted_logits / temperature.clamp(min=1e-5), dim=-1)
    drop = (ranks >= top_k) | ((probs.cumsum(-1) - probs) > top_p)  # always keeps rank 0
    probs = probs.masked_fill(drop, 0.0)
    for i in torch.nonzero(~greedy).flatten().tolist():
        choice = torch.multinomial(probs[i], 1, generator=generators[i])
        next_ids[i] = sorted_idx[i, choice[0]]
    return next_ids


def _first_stop(text: str, stops: Sequence[str]) -> int | None:
    hits = [text.find(s) for s in stops if s and s in text]
    return min(hits) if hits else None
