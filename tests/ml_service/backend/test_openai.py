"""The OpenAI-compatible routes, driven by real clients over real HTTP: the official `openai`
Python package (sync and async) and Node's `fetch`, against a real server process."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess

import httpx
import openai
import pytest
from fastapi.testclient import TestClient

from lib.presets import REPO_ROOT
from ml_service.backend.app import create_app
from tests.helpers import CHECKPOINT, app_with, is_russian, running_server, with_settings

pytestmark = pytest.mark.slow
PROMPT = "Москва — столица"
JSON = {"content-type": "application/json"}


@pytest.fixture(scope="module")
def server(live_server):
    """The session's real server (tests/conftest.py): these clients only send it requests;
    the test of keys and limits starts its own, with those settings."""
    return live_server.url


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def model_id(client) -> str:
    return client.models.list().data[0].id


def test_models_lists_the_served_model(client, server):
    cards = client.models.list().data
    meta = httpx.get(f"{server}/metadata").json()
    assert cards[0].id == meta["model_id"] and cards[0].owned_by
    raw = httpx.get(f"{server}/v1/models").json()["data"][0]
    assert raw["context_length"] == meta["limits"]["context_length"]
    assert "Пользователь" in raw["chat_template"]  # the fallback: the model has no template


def test_models_retrieve_gives_the_listed_card_and_404_for_an_unknown_id(client, server, model_id):
    """Issue 32 item 10: `GET /v1/models/{id}` answered 404, so the SDK's `models.retrieve`
    failed. It gives the card `/v1/models` lists; an id not served is OpenAI's 404."""
    card = client.models.retrieve(model_id)
    assert card.id == model_id and card.object == "model" and card.owned_by
    listed = httpx.get(f"{server}/v1/models").json()["data"][0]
    assert httpx.get(f"{server}/v1/models/{model_id}").json() == listed
    for unknown in ("gpt-4o", "org/name", "ru-gpt-tiny-v9"):  # an SDK sends `/` as %2F
        with pytest.raises(openai.NotFoundError) as e:
            client.models.retrieve(unknown)
        assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"
        assert repr(unknown) in e.value.body["message"] and model_id in e.value.body["message"]
    r = httpx.get(f"{server}/v1/models/org/name")  # a plain `/` too
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def sdk(app) -> tuple[openai.OpenAI, TestClient]:
    """The official client over an in-process app (TestClient is an httpx.Client)."""
    http = TestClient(app)
    return openai.OpenAI(base_url="http://testserver/v1", api_key="-", http_client=http), http


def test_a_served_model_name_is_listed_named_and_answered(service, settings):
    """ML_SERVICE_SERVED_MODEL_NAME (vLLM's --served-model-name): /v1/models lists it first, a
    request may name it and the answer carries it; the model id stays accepted."""
    app = app_with(service, settings, served_model_name="  org/gpt2-ru  ")
    client, http = sdk(app)
    with http:
        model_id = http.get("/metadata").json()["model_id"]
        ids = [m.id for m in client.models.list().data]
        assert ids == ["org/gpt2-ru", model_id]
        assert client.models.retrieve("org/gpt2-ru").id == "org/gpt2-ru"
        assert client.models.retrieve(model_id).id == model_id
        for name in ("org/gpt2-ru", model_id, None):  # each answered with the served name
            body = {"prompt": PROMPT, "max_tokens": 2, **({"model": name} if name else {})}
            r = http.post("/v1/completions", json=body)
            assert r.status_code == 200 and r.json()["model"] == "org/gpt2-ru", r.text
        chat = client.chat.completions.create(
            model="org/gpt2-ru", messages=[{"role": "user", "content": "Привет"}], max_tokens=2
        )
        assert chat.model == "org/gpt2-ru"
        with pytest.raises(openai.NotFoundError) as e:
            client.completions.create(model="gpt2-ru", prompt=PROMPT, max_tokens=2)
        assert e.value.body["code"] == "model_not_found"
        assert "(org/gpt2-ru, " in e.value.body["message"]  # what is served
        with pytest.raises(openai.NotFoundError):
            client.models.retrieve("gpt2-ru")
    # unset (or blank): today's names
    assert with_settings(settings, served_model_name=" ").served_model_name is None
    client, http = sdk(app_with(service, settings))
    with http:
        assert [m.id for m in client.models.list().data] == [model_id]
        r = http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 1})
        assert r.json()["model"] == model_id


def test_a_served_model_name_leaves_the_versions_their_names(settings, models_dir):
    """With versions: the served name goes to the split like the model id; a version's name
    still pins that version."""
    s = with_settings(
        settings,
        models_dir=models_dir,
        model_version="v1",
        traffic="v1=100",
        served_model_name="gpt2-ru",
    )
    client, http = sdk(create_app(s))
    with http:
        ids = [m.id for m in client.models.list().data]
        assert ids[0] == "gpt2-ru" and {"ru-gpt-tiny-v1", "v1"} <= set(ids)
        assert client.models.retrieve("v1").version == "v1"
        r = http.post("/v1/completions", json={"model": "gpt2-ru", "prompt": "a", "max_tokens": 1})
        assert r.status_code == 200 and r.json()["model"] == "gpt2-ru"
        assert r.headers["x-model-version"] == "v1"


def test_greedy_completion_equals_forward(client, server, model_id):
    forward = httpx.post(
        f"{server}/forward",
        # OpenAI's defaults: no repetition penalty, no minimum length (/forward's is 10 tokens)
        json={
            "text": PROMPT,
            "max_new_tokens": 12,
            "temperature": 0,
            "repetition_penalty": 1.0,
            "min_new_tokens": 0,
        },
        timeout=60,
    ).json()
    done = client.completions.create(model=model_id, prompt=PROMPT, max_tokens=12, temperature=0)
    assert done.choices[0].text == forward["text"] and done.object == "text_completion"
    assert done.usage.completion_tokens == forward["usage"]["completion_tokens"]
    assert done.model == model_id and done.system_fingerprint
    # streamed: the same text in pieces, the finish reason on the last content chunk, then usage
    chunks = list(
        client.completions.create(
            model=model_id,
            prompt=PROMPT,
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    content = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].text for c in content) == forward["text"]
    assert content[-1].choices[0].finish_reason == done.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in content[:-1])
    assert chunks[-1].usage.completion_tokens == done.usage.completion_tokens
    assert not chunks[-1].choices


def test_token_id_prompts_and_several_prompts(client, server, model_id):
    ids = httpx.post(f"{server}/v1/completions", json={"prompt": PROMPT, "max_tokens": 1}).json()
    assert ids["usage"]["prompt_tokens"] > 0
    text = client.completions.create(model=model_id, prompt=PROMPT, max_tokens=6, temperature=0)
    tok = __import__("lib.tokenizer", fromlist=["load_tokenizer"]).load_tokenizer(CHECKPOINT)
    as_ids = tok(PROMPT)["input_ids"]
    by_ids = client.completions.create(model=model_id, prompt=as_ids, max_tokens=6, temperature=0)
    assert by_ids.choices[0].text == text.choices[0].text
    both = client.completions.create(
        model=model_id, prompt=[PROMPT, "Он открыл дверь и"], max_tokens=6, temperature=0, n=2
    )
    assert [c.index for c in both.choices] == [0, 1, 2, 3]
    assert both.choices[0].text == both.choices[1].text == text.choices[0].text  # greedy


def test_n_with_a_seed_is_reproducible_and_choice_i_uses_seed_plus_i(client, model_id):
    ask = dict(model=model_id, prompt=PROMPT, max_tokens=10, temperature=0.9, seed=40)
    first = client.completions.create(n=3, **ask)
    again = client.completions.create(n=3, **ask)
    assert [c.text for c in first.choices] == [c.text for c in again.choices]
    third = client.completions.create(n=1, **{**ask, "seed": 42})
    assert third.choices[0].text == first.choices[2].text
    assert len({c.text for c in first.choices}) > 1


def test_logprobs_and_echo_score_the_prompt(client, model_id):
    out = client.completions.create(
        model=model_id, prompt=PROMPT, max_tokens=3, temperature=0, logprobs=2, echo=True
    )
    lp = out.choices[0].logprobs
    assert out.choices[0].text.startswith(PROMPT)
    assert lp.token_logprobs[0] is None and all(v <= 0 for v in lp.token_logprobs[1:])
    assert "".join(lp.tokens) == out.choices[0].text
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    scored = client.completions.create(
        model=model_id, prompt=PROMPT, max_tokens=0, logprobs=0, echo=True
    )
    assert scored.choices[0].text == PROMPT and scored.usage.completion_tokens == 0
    n_prompt = scored.usage.prompt_tokens
    assert scored.choices[0].logprobs.token_logprobs == pytest.approx(lp.token_logprobs[:n_prompt])


def test_chat_completion_streamed_and_not(client, model_id):
    messages = [
        {"role": "system", "content": "Отвечай по-русски."},
        {"role": "user", "content": [{"type": "text", "text": "Расскажи о Москве."}]},
    ]
    done = client.chat.completions.create(
        model=model_id,
        messages=messages,
        max_completion_tokens=16,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
        # the default model's likeliest first token after "Ассистент:" is the end of text: a greedy
        # answer would be empty (docs/openai.md, "Chat template"); vLLM's `min_tokens` holds it off
        extra_body={"min_tokens": 4},
    )
    message = done.choices[0].message
    assert message.role == "assistant" and done.object == "chat.completion"
    assert is_russian(message.content), message.content
    entries = done.choices[0].logprobs.content
    assert entries and all(len(e.top_logprobs) == 2 and e.logprob <= 0 for e in entries)
    chunks = list(
        client.chat.completions.create(
            model=model_id,
            messages=messages,
            max_tokens=16,
            temperature=0,
            stream=True,
            extra_body={"min_tokens": 4},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == message.content
    assert chunks[-1].choices[0].finish_reason == done.choices[0].finish_reason


def test_async_client_streams_a_chat(server, model_id):
    async def run() -> str:
        client = openai.AsyncOpenAI(base_url=f"{server}/v1", api_key="x", max_retries=0)
        stream = await client.chat.completions.create(
            model=model_id,
            messages=[{"role": "user", "content": "Привет!"}],
            max_tokens=8,
            seed=1,
            stream=True,
        )
        pieces = [c.choices[0].delta.content or "" async for c in stream if c.choices]
        await client.close()
        return "".join(pieces)

    assert asyncio.run(run()) == asyncio.run(run())  # seeded: the same text twice


BAD = {
    "temperature": {"temperature": 9},
    "max_tokens": {"max_tokens": 100000},
    "n": {"n": 0},
    "stop": {"stop": [""]},
    "logit_bias": {"logit_bias": {"x": 1}},
    "prompt": {"prompt": ""},
}


@pytest.mark.parametrize("param", list(BAD))
def test_bad_requests_are_400_naming_the_param(client, model_id, param):
    body = {"model": model_id, "prompt": PROMPT, "max_tokens": 2, **BAD[param]}
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(**body)
    err = e.value.body
    assert e.value.status_code == 400 and err["type"] == "invalid_request_error"
    assert err["param"].split(".")[0] == param, err


# found by schemathesis once /v1 was in the schema: huge ids reached the tokenizer (a 500)
BAD_PROMPTS = {
    "[[5, 2**70]]": ([[5, 2**70]], "prompt 0: token id 1180591620717411303424 is outside"),
    "[5, 9000]": ([5, 9000], "token id 9000 is outside the vocabulary [0, 4096)"),
    "[[5.0, 6]]": ([[5.0, 6]], "prompt must be a string, a list of strings, a list of token"),
    "[true]": ([True], "prompt must be a string"),
    "[[1, 2], [3, -4]]": ([[1, 2], [3, -4]], "prompt[1][1]: Input should be greater than"),
    "['a', lone surrogate]": (["a", "\ud800"], "prompt[1]: not valid Unicode text"),
}


@pytest.mark.parametrize("case", list(BAD_PROMPTS))
def test_bad_prompts_are_400_saying_what_is_wrong(server, case):
    prompt, message = BAD_PROMPTS[case]
    r = httpx.post(
        f"{server}/v1/completions",
        content=json.dumps({"prompt": prompt, "max_tokens": 2}),
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "prompt" and message in err["message"], err


def test_unknown_model_is_404_and_unknown_fields_are_ignored(client, server, model_id):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-4o", prompt=PROMPT, max_tokens=2)
    assert e.value.body["code"] == "model_not_found"
    r = httpx.post(
        f"{server}/v1/completions",
        json={"prompt": PROMPT, "max_tokens": 2, "best_of": 1, "suffix": None, "x_new": 1},
    )
    assert r.status_code == 200, r.text
    for body in ({}, {"messages": []}, {"messages": "hi"}, [1, 2]):
        r = httpx.post(f"{server}/v1/chat/completions", json=body)
        assert r.status_code == 400 and "error" in r.json(), r.text
    malformed = b'{"prompt": [[[[[['
    r = httpx.post(f"{server}/v1/completions", content=malformed, headers=JSON, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "body"


def test_keys_and_limits_raise_the_matching_client_errors():
    env = {"ML_SERVICE_API_KEYS": "k1", "ML_SERVICE_RATE_LIMIT": "3/minute"}
    with running_server(["--checkpoint", str(CHECKPOINT)], env=env) as proc:
        wrong = openai.OpenAI(base_url=f"{proc.url}/v1", api_key="nope", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            wrong.models.list()
        right = openai.OpenAI(base_url=f"{proc.url}/v1", api_key="k1", max_retries=0)
        model = right.models.list().data[0].id  # 1 of the 3 requests a minute
        assert right.completions.create(model=model, prompt="a", max_tokens=1).choices
        right.models.list()
        with pytest.raises(openai.RateLimitError) as e:
            right.models.list()
        assert int(e.value.response.headers["retry-after"]) >= 1


@pytest.mark.skipif(shutil.which("node") is None, reason="no node on PATH")
def test_node_fetch_streams_a_chat_and_gets_a_completion(server, model_id):
    script = REPO_ROOT / "examples" / "openai_client.mjs"
    r = subprocess.run(
        ["node", str(script), f"{server}/v1", model_id],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    # (a busy server may send the whole text as one piece: its backlog)
    assert out["chat_chunks"] >= 1 and out["chat_text"] and out["completion_text"]
    assert out["finish_reason"] in ("stop", "length")


def test_openapi_describes_the_v1_routes_without_dangling_references(server):
    doc = httpx.get(f"{server}/openapi.json").json()
    assert {"/v1/models", "/v1/completions", "/v1/chat/completions"} <= set(doc["paths"])
    body = doc["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]
    messages = body["application/json"]["schema"]["properties"]["messages"]
    assert "role" in messages["items"]["properties"]  # the message model, written in place
    # every reference points into the document (ReDoc failed on `#/$defs/...`)
    assert "#/$defs/" not in json.dumps(doc)


# issue 32: digits to str.isdigit() that int() refuses, and more digits than int() reads, were a
# 500 whose exception reached uvicorn, which closed the keep-alive connection
ODD_DIGIT_KEYS = {"superscript": "²", "circled": "①", "4301 digits": "1" * 4301}
ROUTES = {
    "completions": {"prompt": PROMPT, "max_tokens": 1},
    "chat/completions": {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": 1},
}


@pytest.mark.parametrize("route", list(ROUTES))
@pytest.mark.parametrize("key", list(ODD_DIGIT_KEYS))
def test_a_logit_bias_key_int_refuses_is_a_400_naming_it(server, route, key):
    body = {**ROUTES[route], "logit_bias": {ODD_DIGIT_KEYS[key]: 1}}
    r = httpx.post(f"{server}/v1/{route}", json=body, timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "logit_bias" and "token ids" in err["message"], err
    assert len(r.text) < 500  # the 4,301 digits are not echoed


def test_after_a_bad_logit_bias_the_pooled_connection_serves_20_more(server):
    with httpx.Client(base_url=server, timeout=60) as c:
        for key in ODD_DIGIT_KEYS.values():
            body = {**ROUTES["completions"], "logit_bias": {key: 1}}
            assert c.post("/v1/completions", json=body).status_code == 400
        for _ in range(20):  # no ReadError: the connection was kept
            r = c.post("/forward", json={"text": PROMPT, "max_new_tokens": 1})
            assert r.status_code == 200, r.text


def test_a_repeated_system_prompt_is_reported_as_cached_tokens(client, server, model_id):
    """The prefix cache (on by default): the second chat that begins with the same long system
    prompt is served partly from it, and says so as OpenAI does
    (`usage.prompt_tokens_details.cached_tokens`), streamed or not; /metrics counts the hits."""
    system = "Ты — библиотекарь. Отвечай коротко, по-русски, называй книги и авторов. " * 3
    hits = "ml_service_prefix_cache_hits_total"
    before = metric_sum(httpx.get(f"{server}/metrics").text, hits)

    def chat(question: str, **extra):
        messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
        return client.chat.completions.create(
            model=model_id, messages=messages, max_tokens=4, temperature=0, **extra
        )

    first = chat("Что почитать о море?")
    second = chat("Кто написал «Мцыри»?")
    streamed = list(chat("А стихи о зиме?", stream=True, stream_options={"include_usage": True}))
    usage = streamed[-1].usage
    for u in (second.usage, usage):
        assert 0 < u.prompt_tokens_details.cached_tokens < u.prompt_tokens
    assert (
        first.usage.prompt_tokens_details.cached_tokens
        < second.usage.prompt_tokens_details.cached_tokens
    )
    after = metric_sum(httpx.get(f"{server}/metrics").text, hits)
    assert after - before >= second.usage.prompt_tokens_details.cached_tokens


def metric_sum(text: str, name: str) -> float:
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name + "{") or line.startswith(name + " ")
    )
