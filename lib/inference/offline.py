"""Generation without a server: a fixed list of prompts run to the end in one `DecodeBatch`
(library use, the training loop's sample continuations, the ONNX export's check)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from lib.inference.generation import DecodeBatch
from lib.inference.prompts import check_fits, check_tokens, encode_prompts
from lib.inference.rows import GenerationRequest
from lib.inference.types import GenerationParams, GenerationResult


def generate(
    model,
    tokenizer,
    prompts: Sequence[str],
    params: Sequence[GenerationParams],
    should_stop: Callable[[], bool] | None = None,
) -> list[GenerationResult]:
    """Generate a continuation for every prompt, each row with its own parameters.

    `should_stop` is asked before every forward pass; when it answers True the remaining rows end
    with finish_reason "cancelled".
    """
    if not prompts:
        return []
    prompt_ids = encode_prompts(tokenizer, prompts)
    check_fits(prompt_ids, params, model.config.n_positions)
    check_tokens(prompt_ids, params, model.config.vocab_size)
    return run_to_end(model, tokenizer, prompt_ids, params, should_stop)


def run_to_end(
    model,
    tokenizer,
    prompt_ids: Sequence[list[int]],
    params: Sequence[GenerationParams],
    should_stop: Callable[[], bool] | None = None,
) -> list[GenerationResult]:
    """`generate` for prompts already tokenized (by `encode_prompts`) and checked to fit."""
    if not prompt_ids:
        return []
    requests = [GenerationRequest(ids, p) for ids, p in zip(prompt_ids, params, strict=True)]
    batch = DecodeBatch(model, tokenizer, max_rows=len(requests))

    def stopping() -> bool:
        if should_stop is not None and should_stop():
            for r in requests:
                r.cancel()
            return True
        return False

    stopping()
    batch.admit(requests)
    while batch.rows:
        stopping()
        batch.step()
    for r in requests:
        if r.error is not None:
            raise r.error
    return [r.result for r in requests]
