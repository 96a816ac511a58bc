"""Request and response models. Requests convert themselves into `GenerationParams`."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from lib.inference import GenerationParams, GenerationResult

DEFAULTS = GenerationParams()  # the defaults live in lib, once
MIN_REPETITION_PENALTY = 0.01  # below it, dividing a logit by the penalty can overflow float32


def _encodable(v: str) -> str:
    """A lone surrogate (`"\\ud800"` is valid JSON) is not text: no tokenizer can take it."""
    try:
        v.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(
            f"not valid Unicode text: a lone surrogate (U+{ord(v[e.start]):04X}) at character "
            f"{e.start}"
        ) from None
    return v


# every text a request carries (prompts, stop strings, names) is this type
Text = Annotated[str, AfterValidator(_encodable)]
NUMBER_FIELDS = (
    "max_new_tokens",
    "min_new_tokens",
    "temperature",
    "top_p",
    "top_k",
    "repetition_penalty",
    "seed",
)


class GenerationOptions(BaseModel):
    """Generation parameters shared by /forward and /forward_batch (all optional)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    max_new_tokens: int = Field(
        DEFAULTS.max_new_tokens, ge=1, description="tokens to generate at most"
    )
    min_new_tokens: int = Field(
        DEFAULTS.min_new_tokens,
        ge=0,
        description="do not end the text (end-of-document token) before this many tokens",
    )
    temperature: float = Field(
        DEFAULTS.temperature,
        ge=0.0,
        le=5.0,
        description="sampling temperature; 0 means greedy (a positive value below 1e-5 samples "
        "as 1e-5)",
    )
    top_p: float = Field(
        DEFAULTS.top_p,
        gt=0.0,
        le=1.0,
        description="nucleus sampling: keep the smallest set of tokens with this probability",
    )
    top_k: int = Field(
        DEFAULTS.top_k, ge=0, description="keep the k most likely tokens; 0 disables"
    )
    repetition_penalty: float = Field(
        DEFAULTS.repetition_penalty,
        ge=MIN_REPETITION_PENALTY,
        le=10.0,
        description="> 1 discourages repeating tokens already seen, < 1 encourages it",
    )
    seed: int | None = Field(
        None, ge=0, le=2**63 - 1, description="same seed and input, same output"
    )
    stop: list[Text] | None = Field(
        None, max_length=8, description="stop before the first of these strings"
    )

    @field_validator(*NUMBER_FIELDS, mode="before")
    @classmethod
    def _not_a_boolean(cls, v):
        if isinstance(v, bool):  # JSON's true/false would otherwise pass as 1/0
            raise ValueError("must be a number, not a boolean")
        return v

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


def parameter_ranges(model: type[BaseModel]) -> dict[str, dict]:
    """Each numeric field's default and bounds, from the schema itself (for /metadata)."""
    keys = ("default", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")
    out = {}
    for name, prop in model.model_json_schema()["properties"].items():
        entry = {k: prop[k] for k in keys if k in prop}
        for option in prop.get("anyOf", []):  # an optional number: its bounds are in here
            entry.update({k: option[k] for k in keys if k in option})
        if name in NUMBER_FIELDS:
            out[name] = entry
    return out


def _non_blank(v: str) -> str:
    if not v.strip():
        raise ValueError("text must not be empty")
    return v


CACHE_DOC = (
    "false: never answer from the response cache, nor store this answer there (only greedy or "
    "seeded requests are ever cached; the `Cache-Control: no-cache` / `no-store` headers work too)"
)


class ForwardRequest(GenerationOptions):
    text: Text = Field(..., description="the prompt (UTF-8)", examples=["Привет, мир!"])
    stream: bool = Field(
        False,
        description="answer with Server-Sent Events: `token` events with pieces of text as they "
        "are generated, then one `done` event with the whole response",
    )
    cache: bool = Field(True, description=CACHE_DOC)

    _text = field_validator("text")(classmethod(lambda cls, v: _non_blank(v)))


class ForwardBatchRequest(GenerationOptions):
    texts: list[Text] = Field(
        ...,
        min_length=1,
        description="prompts; one result per text, in order",
        examples=[["Привет, мир!", "Москва"]],
    )
    cache: bool = Field(True, description=CACHE_DOC)

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
