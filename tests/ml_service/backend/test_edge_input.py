"""Bad input at the edges of the contract: bodies a JSON parser chokes on, text that is not text,
batches over their limits, and the context limit at its exact edge. Each one is a 400 that says
what is wrong (in our words), never a 500 or a 503."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr

from ml_service.backend.api import MAX_JSON_DEPTH, json_depth_exceeds
from ml_service.backend.app import create_app
from ml_service.services.score import ScoreService

DEEP = b'{"text": ' + b"[" * 5000 + b"]" * 5000 + b"}"
BIG_INT = b'{"text": "a", "seed": ' + b"9" * 5000 + b"}"
SURROGATE = b'{"text": "\\ud800"}'


@pytest.fixture(scope="module")
def score_client(service, settings):
    app = create_app(settings, service=ScoreService(settings, inference=service))
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


@pytest.fixture(scope="module")
def admin_client(service, settings):
    from ml_service.services.text_generation import TextGenerationService

    s = settings.model_copy(update={"admin_token": SecretStr("adm")})
    app = create_app(s, service=TextGenerationService(s, inference=service))
    with TestClient(
        app, raise_server_exceptions=False, headers={"Authorization": "Bearer adm"}
    ) as c:
        yield c


def assert_400(r, loc: list | None = None, says: str | None = None) -> None:
    assert r.status_code == 400, (r.status_code, r.text)
    body = r.json()
    assert body["detail"] == "bad request" and body["errors"], body
    if loc is not None:
        assert body["errors"][0]["loc"] == loc, body
    if says is not None:
        assert says in body["errors"][0]["msg"], body
    assert "Traceback" not in r.text and "codec" not in r.text


def test_depth_check_ignores_brackets_inside_strings():
    assert not json_depth_exceeds(b'{"text": "' + b"[" * 500 + b'"}')
    assert not json_depth_exceeds(b'{"a": "\\"[[[", "b": [[1]]}' + b" " * 10)
    nested = b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH
    assert not json_depth_exceeds(nested)
    assert json_depth_exceeds(b"[" + nested + b"]")
    assert json_depth_exceeds(b'{"t": "]]]]", "x": ' + b"[" * 40 + b"]" * 40 + b"}")


@pytest.mark.parametrize(
    "route", ["/forward", "/forward_batch", "score /forward", "score /forward_batch", "reload"]
)
@pytest.mark.parametrize(
    "body,says", [(DEEP, "nested more than"), (BIG_INT, "too many digits"), (b"\xff{}", "UTF-8")]
)
def test_unparsable_bodies_are_400_on_every_route(
    client, score_client, admin_client, route, body, says
):
    c = {"score": score_client, "reload": admin_client}.get(route.split()[0], client)
    path = "/admin/reload" if route == "reload" else route.split()[-1]
    r = c.post(path, content=body, headers={"content-type": "application/json"})
    assert_400(r, ["body"], says)


def test_lone_surrogates_are_400_naming_the_field(client, score_client):
    cases = [
        (client, "/forward", {"text": "\ud800"}, ["text"]),
        (client, "/forward", {"text": "ok", "stop": ["x", "\udfff"]}, ["stop", "1"]),
        (client, "/forward_batch", {"texts": ["ok", "a\ud800b"]}, ["texts", "1"]),
        (score_client, "/forward", {"text": "\ud800"}, ["text"]),
        (score_client, "/forward_batch", {"items": [{"text": "a"}, {"text": "\ud800"}]}, None),
    ]
    for c, path, body, loc in cases:
        # as the JSON escape \ud800 (httpx's own json= cannot encode a lone surrogate)
        r = c.post(path, content=json.dumps(body), headers={"content-type": "application/json"})
        assert_400(r, loc or ["items", "1", "text"], "surrogate")
    # raw bytes of a surrogate (CESU-style) in the body are not UTF-8 at all
    raw = b'{"text": "\xed\xa0\x80"}'
    assert_400(client.post("/forward", content=raw, headers={"content-type": "application/json"}))
    # in an uploaded file (a form field cannot carry one: UTF-8 has no surrogates)
    upload = client.post("/forward", files={"file": ("p.txt", b"\xed\xa0\x80", "text/plain")})
    assert_400(upload, ["file"])


def test_booleans_and_non_finite_numbers_are_refused(client):
    r = client.post("/forward", json={"text": "a", "max_new_tokens": True})
    assert_400(r, ["max_new_tokens"], "boolean")
    r = client.post(
        "/forward",
        content=b'{"text": "a", "temperature": NaN}',
        headers={"content-type": "application/json"},
    )
    assert_400(r, ["temperature"], "finite")
    # a form's numbers are text, and still parse
    assert client.post("/forward", data={"text": "a", "max_new_tokens": "2"}).status_code == 200


def test_score_batch_obeys_its_limits_and_names_the_item(score_client, settings):
    limit = min(settings.max_texts, settings.max_queue)
    assert score_client.get("/metadata").json()["limits"]["max_texts"] == limit
    ok = score_client.post("/forward_batch", json={"items": [{"text": "а"}] * limit})
    assert ok.status_code == 200 and len(ok.json()["results"]) == limit
    for n in (limit + 1, 300, 5000):
        r = score_client.post("/forward_batch", json={"items": [{"text": "а"}] * n})
        assert_400(r, ["items"], f"the limit is {limit}")
        assert "retry-after" not in r.headers
    r = score_client.post("/forward_batch", json={"items": [{"text": "a"}, {"text": " "}]})
    assert_400(r, ["items", "1", "text"])
    r = score_client.post("/forward_batch", json={"items": [{"text": "a"}, {"text": "а, " * 400}]})
    assert_400(r, ["items", "1", "text"], "context")
    schema = score_client.get("/openapi.json").json()["paths"]["/forward_batch"]["post"]
    assert "items" in str(schema["requestBody"]["content"]["application/json"]["schema"])


def test_a_batch_larger_than_the_queue_is_a_400_not_a_503(service, settings):
    from ml_service.services.text_generation import TextGenerationService

    s = settings.model_copy(update={"max_queue": 4})
    app = create_app(s, service=TextGenerationService(s, inference=service))
    with TestClient(app, raise_server_exceptions=False) as c:
        assert c.get("/metadata").json()["limits"]["max_texts"] == 4
        r = c.post("/forward_batch", json={"texts": ["а"] * 5, "max_new_tokens": 1})
        assert_400(r, ["texts"], "the limit is 4")


def test_the_context_holds_exactly_prompt_plus_new_tokens(client, service):
    """prompt tokens + max_new_tokens <= context (the leading end-of-document token is free), at
    the exact edge, and /metadata's max_new_tokens can be used."""
    ctx = service.context_length
    limits = client.get("/metadata").json()["limits"]
    assert limits["context_length"] == ctx and limits["max_new_tokens"] == ctx - 1

    def prompt(n: int) -> str:  # " а" is one token each
        text = " а" * n
        assert len(service.tokenizer(text)["input_ids"]) == n
        return text

    edge = {"max_new_tokens": 1, "min_new_tokens": 1, "temperature": 0}
    r = client.post("/forward", json={"text": prompt(ctx - 1), **edge})
    assert r.status_code == 200 and r.json()["usage"] == {
        "prompt_tokens": ctx - 1,
        "completion_tokens": 1,
        "total_tokens": ctx,
    }
    assert_400(client.post("/forward", json={"text": prompt(ctx), **edge}), ["text"], "context")
    longest = {"max_new_tokens": ctx - 1, "min_new_tokens": ctx - 1, "seed": 1}
    r = client.post("/forward", json={"text": prompt(1), **longest})
    assert r.status_code == 200 and r.json()["usage"]["total_tokens"] == ctx, r.text
    over = {**longest, "max_new_tokens": ctx, "min_new_tokens": 0}
    assert_400(client.post("/forward", json={"text": prompt(1), **over}))


def test_metadata_states_the_parameter_ranges(client):
    params = client.get("/metadata").json()["sampling"]
    assert params["repetition_penalty"] == {"default": 1.1, "minimum": 0.01, "maximum": 10.0}
    assert params["temperature"]["maximum"] == 5.0 and params["top_p"]["exclusiveMinimum"] == 0
    r = client.post("/forward", json={"text": "a", "repetition_penalty": 0.0099})
    assert_400(r, ["repetition_penalty"])
