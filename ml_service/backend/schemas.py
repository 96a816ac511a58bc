"""Request and response models. Requests convert themselves into `GenerationParams`."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from lib.inference import GenerationParams, GenerationResult
from lib.inference.constraints import Constraint

DEFAULTS = GenerationParams()  # the defaults live in lib, once
# The ranges both dialects (/forward and /v1) accept, written once: where the sampling arithmetic
# stays finite in float32 (the issue-19 probe: a repetition penalty of 1e-39 overflowed a batch)
MAX_TEMPERATURE = 5.0
MIN_REPETITION_PENALTY = 0.01  # below it, dividing a logit by the penalty can overflow float32
MAX_REPETITION_PENALTY = 10.0
MAX_SEED = 2**63 - 1
MAX_STOP_STRINGS = 8
MAX_STOP_CHARS = 64  # each stop string has 1 to this many characters


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


def _non_blank(v: str) -> str:
    if not v.strip():
        raise ValueError("text must not be empty")
    return v


def check_stop_strings(stops: list[str] | None) -> None:
    """At most MAX_STOP_STRINGS stop strings of 1 to MAX_STOP_CHARS characters (both dialects)."""
    if stops is None:
        return
    if len(stops) > MAX_STOP_STRINGS:
        raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings, not {len(stops)}")
    if any(not s or len(s) > MAX_STOP_CHARS for s in stops):
        raise ValueError(f"each stop string must have 1 to {MAX_STOP_CHARS} characters")


def stop_schema(schema: dict) -> None:
    """`json_schema_extra` of a `stop` field: its limits in the OpenAPI document too (on each
    string and list member of the union)."""
    for option in schema.get("anyOf", [schema]):
        strings = option.get("items", option)
        if strings.get("type") == "string":
            strings.update(minLength=1, maxLength=MAX_STOP_CHARS)
        if option.get("type") == "array":
            option["maxItems"] = MAX_STOP_STRINGS


# every text a request carries (prompts, stop strings, names) is this type
Text = Annotated[str, AfterValidator(_encodable)]
# a prompt: also not empty (in a list, its error names its index: ["texts", 3])
NonBlankText = Annotated[Text, AfterValidator(_non_blank)]
NUMBER_FIELDS = (
    "max_new_tokens",
    "min_new_tokens",
    "temperature",
    "top_p",
    "top_k",
    "repetition_penalty",
    "seed",
)


# Every request model validates strictly (pydantic's strict mode): an integer field takes a JSON
# integer only (not "5", not 5.0, not true), a number field a JSON number (an integer too), a
# boolean field true or false (not "yes", not 1). A form carries text: `bodies.read_form` reads
# each field from its text first, as strictly.
STRICT = ConfigDict(strict=True, allow_inf_nan=False)


class StructuredOutputs(BaseModel):
    """vLLM's `structured_outputs`: exactly one constraint on the generated text."""

    model_config = ConfigDict(**STRICT, extra="forbid", populate_by_name=True)

    json_: dict | Text | None = Field(
        None, alias="json", description="a JSON schema (an object, or its JSON text)"
    )
    regex: Text | None = Field(None, description="a regular expression the whole text matches")
    choice: list[Text] | None = Field(None, description="the text is exactly one of these")
    grammar: Text | None = Field(None, description="a Lark (or GBNF) grammar")
    json_object: bool | None = Field(None, description="true: any JSON object")

    @model_validator(mode="after")
    def _exactly_one(self):
        given = [
            name
            for name, value in (
                ("json", self.json_),
                ("regex", self.regex),
                ("choice", self.choice),
                ("grammar", self.grammar),
                ("json_object", self.json_object or None),
            )
            if value is not None
        ]
        if len(given) != 1:
            said = f"got {', '.join(given)}" if given else "got none"
            raise ValueError(
                f"give exactly one of json, regex, choice, grammar, json_object ({said})"
            )
        return self

    def constraint(self) -> Constraint:
        if self.json_ is not None:
            return Constraint.json_schema(self.json_)
        if self.regex is not None:
            return Constraint.regex(self.regex)
        if self.choice is not None:
            return Constraint.choice(self.choice)
        if self.grammar is not None:
            return Constraint.grammar(self.grammar)
        return Constraint.json_object()


STRUCTURED_DOC = (
    "constrain the text (vLLM's field): exactly one of `json` (a JSON schema), `regex`, `choice` "
    "(a list of strings), `grammar` (Lark), `json_object` (true). The text ends with "
    "finish_reason `stop` when complete; `length` leaves a prefix. In a form: its JSON text"
)


class GenerationOptions(BaseModel):
    """Generation parameters shared by /forward and /forward_batch (all optional)."""

    model_config = ConfigDict(**STRICT, extra="forbid")

    max_new_tokens: int = Field(
        DEFAULTS.max_new_tokens, ge=1, description="tokens to generate at most"
    )
    min_new_tokens: int = Field(
        DEFAULTS.min_new_tokens,
        ge=0,
        description="do not end the text (end-of-document token) before this many tokens; the "
        "default is lowered to max_new_tokens when that is smaller",
    )
    temperature: float = Field(
        DEFAULTS.temperature,
        ge=0.0,
        le=MAX_TEMPERATURE,
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
        le=MAX_REPETITION_PENALTY,
        description="> 1 discourages repeating tokens already seen, < 1 encourages it",
    )
    seed: int | None = Field(
        None, ge=0, le=MAX_SEED, description="same seed and input, same output"
    )
    stop: list[Text] | None = Field(
        None,
        description=f"stop before the first of these strings (at most {MAX_STOP_STRINGS}, each "
        f"of 1 to {MAX_STOP_CHARS} characters)",
        json_schema_extra=stop_schema,
    )
    structured_outputs: StructuredOutputs | None = Field(None, description=STRUCTURED_DOC)
    adapter: Text | None = Field(
        None,
        min_length=1,
        max_length=64,
        description="a LoRA adapter loaded here, by name (/metadata lists them): it generates "
        "instead of the base model; omitted: the base model. One not loaded: 404",
    )

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, v: list[str] | None) -> list[str] | None:
        check_stop_strings(v)
        return v

    @model_validator(mode="after")
    def _min_le_max(self):
        if self.min_new_tokens > self.max_new_tokens:
            if "min_new_tokens" in self.model_fields_set:
                raise ValueError("min_new_tokens must be <= max_new_tokens")
            self.min_new_tokens = self.max_new_tokens  # the default, for a short request
        return self

    def to_generation_params(self) -> GenerationParams:
        so = self.structured_outputs
        if isinstance(so, dict):  # a copy made by model_construct from a dump (split_batch)
            so = StructuredOutputs.model_validate(so)
        return GenerationParams(
            max_new_tokens=self.max_new_tokens,
            min_new_tokens=self.min_new_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            repetition_penalty=self.repetition_penalty,
            seed=self.seed,
            stop=tuple(self.stop or ()),
            constraint=None if so is None else so.constraint(),
            adapter=self.adapter,
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


CACHE_DOC = (
    "false: never answer from the response cache, nor store this answer there (only greedy or "
    "seeded requests are ever cached; the `Cache-Control: no-cache` / `no-store` headers work too)"
)


class ForwardRequest(GenerationOptions):
    text: NonBlankText = Field(..., description="the prompt (UTF-8)", examples=["Привет, мир!"])
    stream: bool = Field(
        False,
        description="answer with Server-Sent Events: `token` events with pieces of text as they "
        "are generated, then one `done` event with the whole response",
    )
    cache: bool = Field(True, description=CACHE_DOC)


class ForwardBatchRequest(GenerationOptions):
    texts: list[NonBlankText] = Field(
        ...,
        min_length=1,
        description="prompts; one result per text, in order",
        examples=[["Привет, мир!", "Москва"]],
    )
    cache: bool = Field(True, description=CACHE_DOC)


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
