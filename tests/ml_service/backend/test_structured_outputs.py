"""Structured outputs over HTTP (issue 33): OpenAI's `response_format` and vLLM's
`structured_outputs` on /v1/chat/completions and /v1/completions, and `structured_outputs` on
/forward and /forward_batch (JSON and form), against the session's real server (its engine in its
own process: the constraint crosses the pipe) with the official `openai` client. Answers parse and
validate, choices and regexes match, seeded answers repeat, constrained and free requests
interleave without changing each other, streams say what JSON answers say, and bad constraints
are 400s naming their field.

tests/lib/inference/test_vllm_engine.py runs these same tests with vLLM as the engine (`make
test-vllm`): they take only the fixtures `server`, `client` and `model_id`."""

from __future__ import annotations

import asyncio
import json
import re

import httpx
import openai
import pytest

from tests.helpers import read_sse

try:
    import jsonschema_rs

    def validator(schema: dict):
        return jsonschema_rs.validator_for(schema)

except ModuleNotFoundError:  # .venv-vllm (make test-vllm) has the reference implementation

    def validator(schema: dict):
        import jsonschema

        return jsonschema.Draft202012Validator(schema)


pytestmark = pytest.mark.slow

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 16},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "city": {"enum": ["Москва", "Казань", "Пермь", "Омск"]},
        "tags": {
            "type": "array",
            "items": {"type": "string", "maxLength": 10},
            "minItems": 1,
            "maxItems": 3,
        },
    },
    "required": ["name", "age", "city", "tags"],
    "additionalProperties": False,
}
NESTED = {
    "type": "object",
    "properties": {
        "user": {
            "type": "object",
            "properties": {
                "name": {"type": "string", "maxLength": 12},
                "address": {
                    "type": "object",
                    "properties": {
                        "city": {"type": "string", "maxLength": 12},
                        "zip": {"type": "string", "pattern": "^[0-9]{6}$"},
                    },
                    "required": ["city", "zip"],
                    "additionalProperties": False,
                },
            },
            "required": ["name", "address"],
            "additionalProperties": False,
        },
        "active": {"type": "boolean"},
    },
    "required": ["user", "active"],
    "additionalProperties": False,
}
ITEMS = {
    "type": "array",
    "items": {
        "type": "object",
        "properties": {
            "id": {"type": "integer", "minimum": 1, "maximum": 999},
            "label": {"type": "string", "maxLength": 10},
            "kind": {"enum": ["книга", "фильм", "песня"]},
        },
        "required": ["id", "label", "kind"],
        "additionalProperties": False,
    },
    "minItems": 1,
    "maxItems": 3,
}
SCHEMAS = {"person": PERSON, "nested": NESTED, "items": ITEMS}
# bounded schemas: the longest document they allow fits this budget, so every answer completes
BUDGET = 200


@pytest.fixture(scope="module")
def server(live_server) -> str:
    return live_server.url


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key="-", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def model_id(client) -> str:
    return client.models.list().data[0].id


def gathered(server: str, calls) -> list:
    """Run `calls(client)` (a list of coroutines) concurrently with one async client."""

    async def run():
        async with openai.AsyncOpenAI(
            base_url=f"{server}/v1", api_key="-", max_retries=0, timeout=120
        ) as c:
            return await asyncio.gather(*calls(c))

    return asyncio.run(run())


def test_150_json_schema_answers_parse_and_validate(server, model_id):
    """50 prompts x 3 schemas, sent at once (they share batches), through the official SDK's
    `response_format`, sampled at OpenAI's defaults: every answer is complete JSON that the
    schema validates."""

    def calls(c):
        return [
            c.chat.completions.create(
                model=model_id,
                messages=[{"role": "user", "content": f"Запись номер {i}"}],
                response_format={
                    "type": "json_schema",
                    "json_schema": {"name": name, "schema": schema, "strict": True},
                },
                max_tokens=BUDGET,
                seed=i,
            )
            for name, schema in SCHEMAS.items()
            for i in range(50)
        ]

    answers = gathered(server, calls)
    validators = [validator(s) for s in SCHEMAS.values()]
    assert len(answers) == 150
    for k, answer in enumerate(answers):
        choice = answer.choices[0]
        assert choice.finish_reason == "stop", choice
        validators[k // 50].validate(json.loads(choice.message.content))


def test_json_object_and_choice_and_regex(client, model_id):
    out = client.chat.completions.create(
        model=model_id,
        messages=[{"role": "user", "content": "Дай JSON"}],
        response_format={"type": "json_object"},
        max_tokens=BUDGET,
        temperature=0,
    )
    text = out.choices[0].message.content
    if out.choices[0].finish_reason == "stop":  # free strings may run past the budget
        assert isinstance(json.loads(text), dict)
    assert text.startswith("{")
    choices = ["да", "нет", "может быть"]
    pattern = r"[0-9]{3}-[а-я]{2,5}"
    for seed in range(12):
        c = client.completions.create(
            model=model_id,
            prompt="Ответ:",
            max_tokens=30,
            seed=seed,
            n=2,
            extra_body={"structured_outputs": {"choice": choices}},
        )
        assert all(x.text in choices and x.finish_reason == "stop" for x in c.choices)
        r = client.completions.create(
            model=model_id,
            prompt="Код:",
            max_tokens=40,
            seed=seed,
            extra_body={"structured_outputs": {"regex": pattern}},
        )
        assert re.fullmatch(pattern, r.choices[0].text), r.choices[0].text


def test_a_grammar_and_a_schema_given_as_text(client, model_id):
    grammar = 'start: "цвет: " COLOR\nCOLOR: "красный" | "синий"'
    r = client.completions.create(
        model=model_id,
        prompt="Флаг",
        max_tokens=20,
        seed=1,
        extra_body={"structured_outputs": {"grammar": grammar}},
    )
    assert r.choices[0].text in ("цвет: красный", "цвет: синий")
    r = client.completions.create(
        model=model_id,
        prompt="Флаг",
        max_tokens=20,
        seed=1,
        extra_body={"structured_outputs": {"json": '{"type": "boolean"}'}},
    )
    assert r.choices[0].text in ("true", "false")


def test_seeded_constrained_requests_repeat(client, model_id):
    def ask():
        r = client.chat.completions.create(
            model=model_id,
            messages=[{"role": "user", "content": "Кто это?"}],
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "p", "schema": PERSON},
            },
            max_tokens=BUDGET,
            seed=42,
            extra_body={"cache": False},  # both from the engine
        )
        return r.choices[0].message.content

    assert ask() == ask()


def mixed_request(i: int) -> dict:
    """Request i of the interleaving test: constrained (3 kinds) or free, greedy or seeded."""
    body = {"prompt": f"Строка {i}:", "max_tokens": 40, "cache": False}
    body.update({"temperature": 0} if i % 2 else {"seed": 100 + i})
    kind = i % 4
    if kind == 1:
        body["structured_outputs"] = {"json": ITEMS}
        body["max_tokens"] = BUDGET
    elif kind == 2:
        body["structured_outputs"] = {"regex": r"[А-Я][а-я]{1,8}( [а-я]{1,8}){0,3}\."}
    elif kind == 3:
        body["response_format"] = {"type": "json_object"}
    return body


def test_constrained_and_free_requests_interleave_unchanged(server):
    """16 concurrent clients, constrained and free: each answer equals its solo run."""
    bodies = [mixed_request(i) for i in range(16)]
    with httpx.Client(base_url=server, timeout=120) as http:
        solo = [http.post("/v1/completions", json=b).json()["choices"][0] for b in bodies]

    async def together():
        async with httpx.AsyncClient(base_url=server, timeout=120) as http:
            rs = await asyncio.gather(*(http.post("/v1/completions", json=b) for b in bodies))
        return [r.json()["choices"][0] for r in rs]

    both = asyncio.run(together())
    assert [(c["text"], c["finish_reason"]) for c in both] == [
        (c["text"], c["finish_reason"]) for c in solo
    ]
    assert json.loads(solo[1]["text"])  # the constrained ones are what they should be
    assert re.fullmatch(r"[А-Я][а-я]{1,8}( [а-я]{1,8}){0,3}\.", solo[2]["text"])


def test_streaming_gives_the_text_of_the_json_answer(client, server, model_id):
    kw = dict(
        model=model_id,
        messages=[{"role": "user", "content": "Товары"}],
        response_format={"type": "json_schema", "json_schema": {"name": "i", "schema": ITEMS}},
        max_tokens=BUDGET,
        seed=5,
        extra_body={"cache": False},
    )
    whole = client.chat.completions.create(**kw).choices[0]
    chunks = list(client.chat.completions.create(**kw, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert text == whole.message.content and finish == [whole.finish_reason] == ["stop"]
    body = {
        "text": "Ответ:",
        "seed": 3,
        "max_new_tokens": 20,
        "structured_outputs": {"choice": ["да", "нет"]},
        "cache": False,
    }
    plain = httpx.post(f"{server}/forward", json=body, timeout=60).json()
    streamed = httpx.post(f"{server}/forward", json={**body, "stream": True}, timeout=60)
    events = read_sse(streamed.text)
    assert "".join(d["text"] for e, d in events if e == "token") == plain["text"]
    assert events[-1] == ("done", plain) and plain["finish_reason"] == "stop"


def test_forward_and_forward_batch_take_structured_outputs_as_json_and_as_a_form(server):
    so = {"regex": "[0-9]{4}"}
    body = {"text": "Год:", "temperature": 0, "max_new_tokens": 10, "structured_outputs": so}
    r = httpx.post(f"{server}/forward", json=body, timeout=60)
    assert r.status_code == 200 and re.fullmatch("[0-9]{4}", r.json()["text"])
    assert r.json()["finish_reason"] == "stop"
    form = {
        **body,
        "temperature": "0",
        "max_new_tokens": "10",
        "structured_outputs": json.dumps(so),
    }
    f = httpx.post(f"{server}/forward", files={k: (None, v) for k, v in form.items()}, timeout=60)
    assert f.status_code == 200 and f.json() == r.json()
    batch = {"texts": ["Год:", "Число:"], "seed": 1, "max_new_tokens": 10, "structured_outputs": so}
    b = httpx.post(f"{server}/forward_batch", json=batch, timeout=60)
    assert b.status_code == 200
    assert all(re.fullmatch("[0-9]{4}", x["text"]) for x in b.json()["results"])


def test_a_cached_free_answer_is_never_given_for_a_constrained_request(server):
    """The response cache keys on the constraint (greedy answers are cached by default)."""
    body = {"text": "Привет", "temperature": 0, "max_new_tokens": 8}
    free = httpx.post(f"{server}/forward", json=body, timeout=60).json()
    bound = {**body, "structured_outputs": {"choice": ["один", "два"]}}
    answers = [httpx.post(f"{server}/forward", json=bound, timeout=60).json() for _ in range(2)]
    assert answers[0] == answers[1] and answers[0]["text"] in ("один", "два")
    assert free["text"] not in ("один", "два")


BAD_SCHEMA = {"type": "objectx"}
UNSUPPORTED = {"type": "object", "if": {"required": ["a"]}}
V1_BAD = [  # (body additions, OpenAI param, words of the reason)
    (
        {
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": BAD_SCHEMA},
            }
        },
        "response_format.json_schema.schema",
        "Invalid type",
    ),
    (
        {
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": UNSUPPORTED},
            }
        },
        "response_format.json_schema.schema",
        "Unimplemented keys",
    ),
    ({"structured_outputs": {"json": "{oops"}}, "structured_outputs.json", "not valid JSON"),
    ({"structured_outputs": {"regex": "a("}}, "structured_outputs.regex", "regex"),
    ({"structured_outputs": {"choice": []}}, "structured_outputs.choice", "empty"),
    (
        {"structured_outputs": {"grammar": "start: nothing"}},
        "structured_outputs.grammar",
        "unknown",
    ),
    (
        {"structured_outputs": {"regex": r"[^\x00-\U0010FFFF]"}},
        "structured_outputs.regex",
        "no token can start it",
    ),
    ({"structured_outputs": {}}, "structured_outputs", "exactly one"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs", "exactly one"),
    ({"structured_outputs": {"regexp": "a"}}, "structured_outputs.regexp", ""),
    ({"response_format": {"type": "xml"}}, "response_format.type", ""),
    ({"response_format": {"type": "json_schema"}}, "response_format", "needs the json_schema"),
    (
        {"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}},
        "structured_outputs",
        "not both",
    ),
]


@pytest.mark.parametrize("extra,param,reason", V1_BAD, ids=[p + ":" + r for _, p, r in V1_BAD])
def test_bad_constraints_are_400s_naming_the_field(server, extra, param, reason):
    for path, base in (
        ("/v1/completions", {"prompt": "Привет", "max_tokens": 4}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Привет"}]}),
    ):
        r = httpx.post(f"{server}{path}", json={**base, **extra}, timeout=60)
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["param"] == param and reason in error["message"], error
        assert error["type"] == "invalid_request_error"


FORWARD_BAD = [
    ({"json": BAD_SCHEMA}, ["structured_outputs", "json"], "Invalid type"),
    ({"json": UNSUPPORTED}, ["structured_outputs", "json"], "Unimplemented keys"),
    ({"regex": "a["}, ["structured_outputs", "regex"], "unclosed"),
    ({"choice": []}, ["structured_outputs", "choice"], "empty"),
    ({"regex": r"[^\x00-\U0010FFFF]"}, ["structured_outputs", "regex"], "no token"),
    ({}, ["structured_outputs"], "exactly one"),
]


@pytest.mark.parametrize("so,loc,reason", FORWARD_BAD, ids=[r for _, _, r in FORWARD_BAD])
def test_bad_constraints_on_forward_are_400s_naming_the_field(server, so, loc, reason):
    for path, body in (
        ("/forward", {"text": "Привет", "structured_outputs": so}),
        ("/forward_batch", {"texts": ["Привет", "Мир"], "structured_outputs": so}),
    ):
        r = httpx.post(f"{server}{path}", json=body, timeout=60)
        assert r.status_code == 400, r.text
        (error,) = r.json()["errors"]
        assert error["loc"] == loc and reason in error["msg"], error
    form = httpx.post(
        f"{server}/forward",
        files={"text": (None, "Привет"), "structured_outputs": (None, "[1, 2]")},
        timeout=60,
    )
    assert form.status_code == 400
    assert form.json()["errors"][0]["loc"] == ["structured_outputs"]
