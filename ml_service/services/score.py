"""The score service: how likely is a text under the loaded causal LM?

Returns per-token log-probabilities, the total log-likelihood, perplexity and bits per byte, which
makes it a way to evaluate a checkpoint over HTTP.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from lib.inference import PromptTooLong
from lib.inference.scoring import TextScore
from ml_service.backend.schemas import NonBlankText
from ml_service.contract import InvalidInput
from ml_service.services.common import CheckpointService, check_text_length


class ScoreRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: NonBlankText = Field(..., description="the text to score", examples=["Привет, мир!"])


class TokenLogprob(BaseModel):
    token: str
    logprob: float = Field(
        ..., description="natural log of the token's probability given the text before it"
    )


class ScoreResponse(BaseModel):
    model: str
    tokens: list[TokenLogprob]
    num_tokens: int
    num_bytes: int = Field(..., description="UTF-8 bytes of the text")
    log_likelihood: float = Field(..., description="sum of the token log-probabilities (nats)")
    perplexity: float = Field(..., description="exp(-log_likelihood / num_tokens)")
    bits_per_byte: float = Field(..., description="-log_likelihood / ln 2 / num_bytes")


class ScoreService(CheckpointService):
    name = "score"
    version = "0.1.0"
    description = "per-token log-probabilities, log-likelihood, perplexity and bits/byte of a text"
    request_model = ScoreRequest
    response_model = ScoreResponse

    def preprocess(self, request: ScoreRequest) -> str:
        check_text_length(request.text, self.settings.max_text_chars)
        try:
            self.inference.check_scorable([request.text])
        except PromptTooLong as e:
            raise InvalidInput(str(e)) from None
        return request.text

    def predict(self, batch: list[str]) -> list[TextScore]:
        return self.inference.score(batch)

    def postprocess(self, output: TextScore, request: ScoreRequest) -> ScoreResponse:
        return ScoreResponse(
            model=self.model_id,
            tokens=[
                TokenLogprob(token=t, logprob=lp)
                for t, lp in zip(output.tokens, output.logprobs, strict=True)
            ],
            num_tokens=len(output.logprobs),
            num_bytes=output.num_bytes,
            log_likelihood=output.log_likelihood,
            perplexity=output.perplexity,
            bits_per_byte=output.bits_per_byte,
        )
