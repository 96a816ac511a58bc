"""The OpenAI-compatible request and response models (`/v1/completions`, `/v1/chat/completions`,
`/v1/models`), after OpenAI's API reference and vLLM's `protocol.py`.

Requests ignore fields they do not know (newer clients keep working; the route logs them at debug
level); everything they do know is checked as strictly as `/forward`'s fields (pydantic's strict
mode: `"5"` is not an integer, `1` is not a boolean, `true` is not a number). Requests convert
themselves into `GenerationParams`: OpenAI's defaults (temperature 1, top_p 1, no top-k, no
repetition penalty), its additive presence and frequency penalties, and our extras (`top_k`,
`repetition_penalty`, `min_tokens`, `ignore_eos`). Structured outputs come as OpenAI's
`response_format` (`json_object`, `json_schema`) or as vLLM's `structured_outputs` (one of `json`,
`regex`, `choice`, `grammar`), not both.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from lib.inference import GenerationParams
from lib.inference.constraints import Constraint
from lib.inference.types import MAX_LOGPROBS as MAX_TOP_LOGPROBS  # chat's, as OpenAI: 20
from ml_service.backend.schemas import (
    CACHE_DOC,
    MAX_REPETITION_PENALTY,
    MAX_SEED,
    MAX_STOP_CHARS,
    MAX_STOP_STRINGS,
    MAX_TEMPERATURE,
    MIN_REPETITION_PENALTY,
    STRICT,
    StructuredOutputs,
    Text,
    check_stop_strings,
    stop_schema,
)

MAX_LOGPROBS = 5  # completions' `logprobs`, as OpenAI
MAX_N = 16
MAX_TOKEN_ID_DIGITS = 20  # a logit_bias key longer than this names no token of any vocabulary


class StreamOptions(BaseModel):
    model_config = ConfigDict(**STRICT, extra="ignore")
    include_usage: bool = Field(False, description="send a last chunk with the token usage")


class JsonSchemaFormat(BaseModel):
    """`response_format.json_schema`: OpenAI's named schema (`strict` is accepted: the schema
    is always enforced)."""

    model_config = ConfigDict(**STRICT, extra="ignore", populate_by_name=True)
    name: Text = Field(..., min_length=1, max_length=64)
    description: Text | None = None
    schema_: dict | None = Field(None, alias="schema", description="omitted: any JSON value")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """OpenAI's `response_format`: `text` (free text), `json_object` (any JSON object) or
    `json_schema` (a JSON value valid under `json_schema.schema`)."""

    model_config = ConfigDict(**STRICT, extra="ignore")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self):
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError('type "json_schema" needs the json_schema field')
        return self

    def constraint(self) -> Constraint | None:
        if self.type == "json_object":
            return Constraint.json_object()
        if self.type == "json_schema":
            schema = self.json_schema.schema_
            return Constraint.json_schema({} if schema is None else schema)
        return None


class SamplingRequest(BaseModel):
    """The fields completions and chat share."""

    model_config = ConfigDict(**STRICT, extra="ignore")

    model: str | None = Field(
        None, description="a model id from /v1/models; omitted: the served one"
    )
    temperature: float = Field(1.0, ge=0.0, le=MAX_TEMPERATURE, description="0 is greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=MAX_N, description="choices per prompt, sampled as separate rows")
    stop: Text | list[Text] | None = Field(
        None,
        description=f"up to {MAX_STOP_STRINGS} strings of 1-{MAX_STOP_CHARS} characters",
        json_schema_extra=stop_schema,
    )
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = Field(
        None, ge=0, le=MAX_SEED, description="choice i samples with seed + i (reproducible)"
    )
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = Field(
        None, description="token id (as a string) -> bias in [-100, 100], added to its logit"
    )
    user: str | None = Field(None, description="accepted and ignored (logs carry the API key)")
    cache: bool = Field(True, description=CACHE_DOC)
    # our extras
    top_k: int = Field(0, ge=0, description="keep the k most likely tokens; 0 disables")
    repetition_penalty: float = Field(1.0, ge=MIN_REPETITION_PENALTY, le=MAX_REPETITION_PENALTY)
    min_tokens: int = Field(0, ge=0)
    ignore_eos: bool = False
    # structured outputs: OpenAI's field, or vLLM's (one of them)
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = Field(
        None, description="vLLM's: exactly one of json, regex, choice, grammar, json_object"
    )

    @field_validator("structured_outputs")
    @classmethod
    def _one_way(cls, v, info):
        if v is not None and info.data.get("response_format") is not None:
            raise ValueError("send either response_format or structured_outputs, not both")
        return v

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        check_stop_strings([v] if isinstance(v, str) else v)
        return v

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, v):
        for key, bias in (v or {}).items():
            # decimal digits, what int() reads: str.isdigit() also takes "²" and "①", which it
            # refuses, as it refuses more than 4,300 digits (no vocabulary needs more than 20)
            if not (key.isdecimal() and len(key) <= MAX_TOKEN_ID_DIGITS):
                shown = repr(key[:24]) + ("..." if len(key) > 24 else "")
                raise ValueError(
                    f"logit_bias keys are token ids (up to {MAX_TOKEN_ID_DIGITS} decimal "
                    f"digits); got {shown}"
                )
            if not -100 <= bias <= 100:
                raise ValueError(f"logit_bias values are in [-100, 100]; got {bias}")
        return v

    def constraint(self) -> tuple[Constraint | None, str]:
        """The constraint asked for (None: free text), and the field that asked, as a 400 names
        it (`response_format.json_schema.schema`, `structured_outputs.regex`, ...)."""
        if self.structured_outputs is not None:
            c = self.structured_outputs.constraint()
            return c, f"structured_outputs.{c.field}"
        if self.response_format is not None:
            c = self.response_format.constraint()
            where = "json_schema.schema" if self.response_format.type == "json_schema" else "type"
            return c, f"response_format.{where}"
        return None, ""

    def stops(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    def params(self, max_new_tokens: int, logprobs: int | None, seed: int | None):
        return GenerationParams(
            max_new_tokens=max_new_tokens,
            min_new_tokens=min(self.min_tokens, max_new_tokens),
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            repetition_penalty=self.repetition_penalty,
            seed=seed,
            stop=self.stops(),
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            logit_bias=tuple((int(k), b) for k, b in sorted((self.logit_bias or {}).items())),
            ignore_eos=self.ignore_eos,
            logprobs=logprobs,
            constraint=self.constraint()[0],
        )

    def choice_seed(self, i: int) -> int | None:
        return None if self.seed is None else (self.seed + i) % 2**63


# token ids are integers (5.0 is not one: strict)
TokenIds = Annotated[list[Annotated[int, Field(ge=0, strict=True)]], Field(min_length=1)]

_PROMPT_SHAPES = {
    "text": TypeAdapter(Text),
    "texts": TypeAdapter(list[Text]),
    "ids": TypeAdapter(TokenIds),
    "id_lists": TypeAdapter(list[TokenIds]),
}


class CompletionRequest(SamplingRequest):
    prompt: Text | list[Text] | TokenIds | list[TokenIds] = Field(
        ..., description="a string, strings, token ids, or lists of token ids"
    )
    max_tokens: int | None = Field(16, ge=0, description="0 with echo: score the prompt only")
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False

    @field_validator("prompt", mode="wrap")
    @classmethod
    def _prompt_shape(cls, v, handler):
        """Validated as the one shape it has, so that its error names the problem (the union's
        own errors list every member's)."""

        def ids(x) -> bool:
            return isinstance(x, list) and all(
                isinstance(t, int) and not isinstance(t, bool) for t in x
            )

        if isinstance(v, str):
            shape = "text"
        elif ids(v):
            shape = "ids"
        elif isinstance(v, list) and all(isinstance(x, str) for x in v):
            shape = "texts"
        elif isinstance(v, list) and all(ids(x) for x in v):
            shape = "id_lists"
        else:
            raise ValueError(
                "prompt must be a string, a list of strings, a list of token ids (integers) "
                "or a list of such lists"
            )
        try:
            _PROMPT_SHAPES[shape].validate_python(v)
        except ValidationError as e:
            first = e.errors()[0]
            where = "".join(f"[{i}]" for i in first["loc"] if isinstance(i, int))
            raise ValueError(
                f"prompt{where}: {first['msg'].removeprefix('Value error, ')}"
            ) from None
        return handler(v)

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v):
        if isinstance(v, list) and not v:
            raise ValueError("prompt must not be empty")
        texts = [v] if isinstance(v, str) else [p for p in v if isinstance(p, str)]
        if any(not t for t in texts):
            raise ValueError("prompt must not be empty")
        return v

    @model_validator(mode="after")
    def _zero_tokens(self):
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens 0 needs echo (it scores the prompt without generating)")
        return self

    def prompts(self) -> list[str | list[int]]:
        """The prompts, each a string or a list of token ids."""
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        return list(p)


class TextPart(BaseModel):
    model_config = ConfigDict(**STRICT, extra="ignore")
    type: Literal["text"]
    text: Text


class ChatMessage(BaseModel):
    model_config = ConfigDict(**STRICT, extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: Text | list[TextPart]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_tokens: int | None = Field(None, ge=1, description="deprecated alias of the one below")
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)

    @model_validator(mode="after")
    def _top_needs_logprobs(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    def asked_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


# -- responses ---------------------------------------------------------------------------------
class PromptTokensDetails(BaseModel):
    cached_tokens: int = Field(
        0, description="prompt tokens served by the prefix cache (ML_SERVICE_PREFIX_CACHE_MB)"
    )


class UsageInfo(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails = Field(default_factory=PromptTokensDetails)


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprobEntry(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprobEntry]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length"]


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChatChoice]
    usage: UsageInfo


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    # ours
    context_length: int
    version: str | None
    chat_template: str = Field(..., description="the template chat messages are rendered with")
    root: str | None = Field(None, description="the model id of the weights (vLLM's field)")
    parent: str | None = Field(None, description="a LoRA adapter's: the id of its base model")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class OpenAIErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class OpenAIErrorResponse(BaseModel):
    error: OpenAIErrorBody
