"""Prompts on their way to a model: tokenised behind the document-start token, and checked to fit
the context and the vocabulary before any model work (the service never truncates silently). A text
that cannot fit is refused from its length alone, before it is tokenised (`check_may_fit`)."""

from __future__ import annotations

from collections.abc import Sequence

from lib.inference.types import GenerationParams, InvalidTokens, PromptTooLong
from lib.tokenizer import max_token_chars


def encode_prompts(tokenizer, prompts: Sequence[str]) -> list[list[int]]:
    """Token ids of each prompt behind a leading EOS, which marks a document start in training."""
    return [[tokenizer.eos_token_id] + ids for ids in tokenizer(list(prompts))["input_ids"]]


def check_may_fit(
    tokenizer, prompts: Sequence[str], new_tokens: Sequence[int], context: int
) -> None:
    """PromptTooLong for a prompt that cannot fit the context with `new_tokens` more, told from its
    length alone: no token stands for more than L characters (`max_token_chars`), so a text of N
    characters is at least ceil(N / L) tokens. Costs no tokenising, so a huge prompt is refused
    at once; one that passes may still be too long (`check_fits` decides on its tokens)."""
    chars = max_token_chars(tokenizer)
    if chars is None:  # this tokenizer gives no bound: `check_fits` alone decides
        return
    for i, (text, new) in enumerate(zip(prompts, new_tokens, strict=True)):
        least = -(-len(text) // chars)
        if least + new > context:
            raise PromptTooLong(
                f"prompt of {len(text)} characters is at least {least} tokens (no token stands "
                f"for more than {chars} characters) + max_new_tokens {new} exceeds the context of "
                f"{context} tokens (the service never truncates silently)",
                index=i,
            )


def check_tokens(
    prompt_ids: Sequence[Sequence[int]], params: Sequence[GenerationParams], vocab: int
) -> None:
    """Every prompt id and every `logit_bias` id is a token of the vocabulary [0, vocab), else
    InvalidTokens (ids from a tokenizer always are: this checks ids that came from outside)."""
    for i, (ids, p) in enumerate(zip(prompt_ids, params, strict=True)):
        for what, tokens in (("prompt", ids), ("logit_bias", [t for t, _ in p.logit_bias])):
            bad = [t for t in tokens if not (isinstance(t, int) and 0 <= t < vocab)]
            if bad:
                raise InvalidTokens(
                    f"{what} token id {bad[0]!r} is outside the vocabulary [0, {vocab})", index=i
                )


def check_fits(
    prompt_ids: Sequence[list[int]], params: Sequence[GenerationParams], context: int
) -> None:
    """Prompt tokens + max_new_tokens <= context: the leading end-of-document token takes one
    position, and the last new token is never fed back, so it needs none."""
    for i, (ids, p) in enumerate(zip(prompt_ids, params, strict=True)):
        if len(ids) - 1 + p.max_new_tokens > context:
            raise PromptTooLong(
                f"prompt of {len(ids) - 1} tokens + max_new_tokens {p.max_new_tokens} "
                f"exceeds the context of {context} tokens (the service never truncates silently)",
                index=i,
            )
