"""`POST /v1/completions` (vLLM's `serving_completion.py`): prompts as text, texts, token ids or
lists of them; `echo` puts the prompt first, and with `logprobs` scores it too (with
`max_tokens: 0`, nothing but that)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from fastapi.responses import StreamingResponse

from lib.inference import GenerationResult, TokenLogprob
from ml_service.backend.execution import off_loop
from ml_service.backend.openai_protocol import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
)
from ml_service.backend.openai_serving import (
    FINISH,
    OpenAIChunks,
    OpenAIServing,
    Prompt,
    refuse,
    token_text,
    usage,
)


class OpenAIServingCompletion(OpenAIServing):
    async def create(self, req: CompletionRequest) -> CompletionResponse | StreamingResponse:
        if req.stream and req.logprobs is not None:
            raise refuse("logprobs", "logprobs are not streamed; send stream: false")
        if self.adapter is not None and req.echo and req.logprobs is not None:
            # (the prompt is scored by the base model alone)
            raise refuse("echo", "a prompt's log-probabilities are not scored with an adapter")
        prompts = await off_loop(self.prompts, req)  # tokenized in the preparing thread
        if req.max_tokens == 0:
            return await self.response(req, prompts, scored_only(prompts, req.n))
        items = self.engine_items(req, prompts, req.max_tokens, req.logprobs, "prompt")
        if req.stream:
            chunks = CompletionChunks(self.header("cmpl"), prompts, req)
            return await self.stream(items, req.cache, chunks)
        outputs = await self.generate(items, req.cache)
        return await self.response(req, prompts, outputs)

    def prompts(self, req: CompletionRequest) -> list[Prompt]:
        """The prompts, tokenized (blocking: run it off the event loop). Texts that cannot fit
        are refused from their lengths before any of them is tokenized."""
        tok = self.service.tokenizer
        self.check_constraint(req)
        given = req.prompts()
        texts = [p for p in given if isinstance(p, str)]
        for i, p in enumerate(texts):
            self.check_text("prompt", f"prompt {i}", p)
        self.check_may_fit("prompt", texts, req.max_tokens)
        prompts = []
        for i, p in enumerate(given):
            if isinstance(p, str):
                prompts.append(Prompt(tok(p)["input_ids"], p))
            else:  # ids are checked before the tokenizer sees them (it overflows on huge ones)
                vocab = self.service.vocab_size
                if bad := next((t for t in p if t >= vocab), None):
                    raise refuse(
                        "prompt",
                        f"prompt {i}: token id {bad} is outside the vocabulary [0, {vocab})",
                    )
                prompts.append(Prompt(list(p), tok.decode(p)))
        return prompts

    async def response(
        self, req: CompletionRequest, prompts: list[Prompt], outputs: list[GenerationResult]
    ) -> CompletionResponse:
        tok = self.service.tokenizer
        choices = []
        prompt_scores: dict[int, list] = {}
        for index, out in enumerate(outputs):
            prompt = prompts[index // req.n]
            text = (prompt.text if req.echo else "") + out.text
            logprobs = None
            if req.logprobs is not None:
                entries, ids = list(out.logprobs or []), list(out.token_ids)
                if req.echo:
                    p = index // req.n
                    if p not in prompt_scores:  # scored once per prompt, off the event loop
                        prompt_scores[p] = await asyncio.to_thread(
                            self.service.prompt_logprobs, prompt.ids, req.logprobs
                        )
                    entries, ids = prompt_scores[p] + entries, prompt.ids + ids
                logprobs = completion_logprobs(tok, entries, ids)
            choices.append(
                CompletionChoice(
                    index=index,
                    text=text,
                    logprobs=logprobs,
                    finish_reason=FINISH[out.finish_reason],
                )
            )
        return CompletionResponse(
            **self.header("cmpl"), choices=choices, usage=usage(prompts, outputs)
        )


def scored_only(prompts: list[Prompt], n: int) -> list[GenerationResult]:
    """`max_tokens: 0` with `echo`: nothing is generated."""
    return [GenerationResult("", "length", len(p.ids), 0) for p in prompts for _ in range(n)]


def completion_logprobs(
    tokenizer, entries: Sequence[TokenLogprob | None], ids: Sequence[int]
) -> CompletionLogprobs:
    tokens, values, tops, offsets, at = [], [], [], [], 0
    for token_id, entry in zip(ids, entries, strict=True):
        text = token_text(tokenizer, token_id)
        tokens.append(text)
        offsets.append(at)
        at += len(text)
        values.append(None if entry is None else entry.logprob)
        tops.append(
            None
            if entry is None
            else {
                token_text(tokenizer, t): lp
                for t, lp in [(entry.token_id, entry.logprob), *entry.top]
            }
        )
    return CompletionLogprobs(
        tokens=tokens, token_logprobs=values, top_logprobs=tops, text_offset=offsets
    )


class CompletionChunks(OpenAIChunks):
    """`text_completion` chunks; with `echo`, a choice's first piece comes after its prompt."""

    def __init__(self, header: dict, prompts: list[Prompt], req: CompletionRequest):
        super().__init__(header, "text_completion", prompts, req)
        self.echo, self.n = req.echo, req.n

    def choice(self, i: int, text: str, finish: str | None, first: bool) -> dict:
        if self.echo and first:
            text = self.prompts[i // self.n].text + text
        return {"index": i, "text": text, "logprobs": None, "finish_reason": finish}
