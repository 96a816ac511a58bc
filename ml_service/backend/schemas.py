"""Request and response models. Requests convert themselves into `GenerationParams`."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from lib.inference import GenerationParams, GenerationResult


class GenerationOptions(BaseModel):
    """Generation parameters shared by /forward and /forward_batch (all optional)."""

    model_config = ConfigDict(extra="forbid")

    max_new_tokens: int = Field(64, ge=1, description="tokens to generate at most")
    min_new_tokens: int = Field(
        0, ge=0, description="do not end the text (end-of-document token) before this many tokens"
    )
    temperature: float = Field(
        0.8, ge=0.0, le=5.0, description="sampling temperature; 0 means greedy"
    )
    top_p: float = Field(
        0.95,
        gt=0.0,
        le=1.0,
        description="nucleus sampling: keep the smallest set of tokens with this probability",
    )
    top_k: int = Field(50, ge=0, description="keep the k most likely tokens; 0 disables")
    repetition_penalty: float = Field(
        1.1, gt=0.0, le=10.0, description="> 1 discourages repeating tokens already seen"
    )
    seed: int | None = Field(
        None, ge=0, le=2**63 - 1, description="same seed and input, same output"
    )
    stop: list[str] | None = Field(
        None, max_length=8, description="stop before the first of these strings"
    )

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and any(not s or len(s) > 64 for s in v):
            raise ValueError("each stop string must have 1 to 64 characters")
        return v

    @model_validator(mode="after")
    def _min_le_max(self):
        if self.min_new_tokens > self.max_new_tokens:
            raise ValueError("min_new_tokens must be <= max_new_tokens")
        return self

    def to_generation_params(self) -> GenerationParams:
        return GenerationParams(
            max_new_tokens=self.max_new_tokens,
            min_new_tokens=self.min_new_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            repetition_penalty=self.repetition_penalty,
            seed=self.seed,
            stop=tuple(self.stop or ()),
        )


def _non_blank(v: str) -> str:
    if not v.strip():
        raise ValueError("text must not be empty")
    return v


class ForwardRequest(GenerationOptions):
    text: str = Field(..., description="the prompt (UTF-8)", examples=["Привет, мир!"])
    stream: bool = Field(
        False,
        description="answer with Server-Sent Events: `token` events with pieces of text as they "
        "are generated, then one `done` event with the whole response",
    )

    _text = field_validator("text")(classmethod(lambda cls, v: _non_blank(v)))


class ForwardBatchRequest(GenerationOptions):
    texts: list[str] = Field(
        ...,
        min_length=1,
        description="prompts; one result per text, in order",
        examples=[["Привет, мир!", "Москва"]],
    )

    @field_validator("texts")
    @classmethod
    def _texts(cls, v: list[str]) -> list[str]:
        for i, t in enumerate(v):
            if not t.strip():
                raise ValueError(f"text {i} is empty")
        return v


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class Completion(BaseModel):
    text: str = Field(..., description="the generated continuation (without the prompt)")
    finish_reason: Literal["length", "stop", "eos", "cancelled"]
    usage: Usage

    @classmethod
    def from_result(cls, r: GenerationResult) -> Completion:
        return cls(
            text=r.text,
            finish_reason=r.finish_reason,
            usage=Usage(
                prompt_tokens=r.prompt_tokens,
                completion_tokens=r.completion_tokens,
                total_tokens=r.prompt_tokens + r.completion_tokens,
            ),
        )


class ForwardResponse(Completion):
    model: str = Field(..., description="id of the model that generated")


class ForwardBatchResponse(BaseModel):
    model: str
    results: list[Completion]


class ErrorResponse(BaseModel):
    detail: str
    errors: list[dict] | None = None


class HealthResponse(BaseModel):
    status: Literal["ok"]
