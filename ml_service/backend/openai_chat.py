"""`POST /v1/chat/completions` (vLLM's `serving_chat.py`): the messages are rendered with the
checkpoint's own chat template, or with `FALLBACK_TEMPLATE` (and then `FALLBACK_STOP` ends the
assistant's turn before it writes the user's next one)."""

from __future__ import annotations

from collections.abc import Sequence

from fastapi.responses import StreamingResponse

from lib.inference import GenerationResult, TokenLogprob
from lib.tokenizer import token_bytes
from ml_service.backend.execution import off_loop
from ml_service.backend.openai_protocol import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    TokenLogprobEntry,
    TopLogprob,
)
from ml_service.backend.openai_serving import (
    FALLBACK_STOP,
    FINISH,
    OpenAIChunks,
    OpenAIServing,
    Prompt,
    chat_template,
    refuse,
    usage,
)


class OpenAIServingChat(OpenAIServing):
    async def create(
        self, req: ChatCompletionRequest
    ) -> ChatCompletionResponse | StreamingResponse:
        if req.stream and req.logprobs:
            raise refuse("logprobs", "logprobs are not streamed; send stream: false")
        prompt = await off_loop(self.prompt, req)  # rendered and tokenized off the event loop
        top = (req.top_logprobs or 0) if req.logprobs else None
        fallback = self.service.tokenizer.chat_template is None
        extra_stop = (FALLBACK_STOP,) if fallback else ()
        asked = req.asked_tokens()
        items = self.engine_items(req, [prompt], asked, top, "messages", extra_stop)
        if req.stream:
            return await self.stream(
                items, req.cache, ChatChunks(self.header("chatcmpl"), prompt, req)
            )
        outputs = await self.generate(items, req.cache)
        return self.response(req, prompt, outputs)

    def prompt(self, req: ChatCompletionRequest) -> Prompt:
        """The conversation rendered with the chat template, and tokenized unless it cannot fit
        (blocking: run it off the event loop)."""
        tok = self.service.tokenizer
        self.check_constraint(req)
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        text = tok.apply_chat_template(
            messages,
            chat_template=chat_template(self.loaded),
            tokenize=False,
            add_generation_prompt=True,
        )
        self.check_text("messages", "the conversation", text)
        self.check_may_fit("messages", [text], req.asked_tokens())
        return Prompt(tok(text)["input_ids"], text)

    def response(
        self, req: ChatCompletionRequest, prompt: Prompt, outputs: list[GenerationResult]
    ) -> ChatCompletionResponse:
        tok = self.service.tokenizer
        choices = [
            ChatChoice(
                index=i,
                message=AssistantMessage(content=out.text),
                logprobs=chat_logprobs(tok, out.logprobs or []) if req.logprobs else None,
                finish_reason=FINISH[out.finish_reason],
            )
            for i, out in enumerate(outputs)
        ]
        return ChatCompletionResponse(
            **self.header("chatcmpl"), choices=choices, usage=usage([prompt], outputs)
        )


def chat_logprobs(tokenizer, entries: Sequence[TokenLogprob]) -> ChatLogprobs:
    def top(token_id: int, lp: float) -> TopLogprob:
        raw = token_bytes(tokenizer, token_id)
        return TopLogprob(token=raw.decode("utf-8", errors="replace"), logprob=lp, bytes=list(raw))

    content = []
    for e in entries:
        first = top(e.token_id, e.logprob)
        content.append(
            TokenLogprobEntry(**first.model_dump(), top_logprobs=[top(t, lp) for t, lp in e.top])
        )
    return ChatLogprobs(content=content)


class ChatChunks(OpenAIChunks):
    """`chat.completion.chunk` chunks: a choice's first delta says the role."""

    def __init__(self, header: dict, prompt: Prompt, req: ChatCompletionRequest):
        super().__init__(header, "chat.completion.chunk", [prompt], req)

    def choice(self, i: int, text: str, finish: str | None, first: bool) -> dict:
        delta = {"role": "assistant", "content": text} if first else {"content": text}
        return {"index": i, "delta": delta, "logprobs": None, "finish_reason": finish}
