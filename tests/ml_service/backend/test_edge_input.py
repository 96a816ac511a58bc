"""Bad input at the edges of the contract: bodies a JSON parser chokes on, text that is not text,
batches over their limits, and the context limit at its exact edge. Each one is a 400 that says
what is wrong (in our words), never a 500 or a 503."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr

from ml_service.backend.app import create_app
from ml_service.backend.bodies import MAX_JSON_DEPTH, json_depth_exceeds
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


def test_an_empty_text_in_a_batch_names_its_index(client):
    r = client.post("/forward_batch", json={"texts": ["a", "b", "  "], "max_new_tokens": 1})
    assert_400(r, ["texts", "2"])
    assert r.json()["errors"][0]["msg"] == "text must not be empty"


def test_the_new_token_limit_in_messages_is_the_one_in_metadata(client):
    """max_new_tokens over the limit names /metadata's limits.max_new_tokens (context - 1 for a
    one-token prompt), on /forward and on /v1, not the configured 256."""
    limit = client.get("/metadata").json()["limits"]["max_new_tokens"]
    for asked in (limit + 1, 300):
        r = client.post("/forward", json={"text": "а", "max_new_tokens": asked})
        assert_400(r, ["max_new_tokens"])
        assert r.json()["errors"][0]["msg"] == f"max_new_tokens must be <= {limit}"
        r = client.post("/v1/completions", json={"prompt": "а", "max_tokens": asked})
        assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
        assert r.json()["error"]["message"].endswith(f"must be <= {limit}")


def test_score_item_errors_read_as_a_single_requests(score_client):
    """An item's errors name it and use the same words as /forward's (no pydantic "Value error, "
    prefix: the items are converted by the shared pydantic error conversion)."""
    r = score_client.post("/forward_batch", json={"items": [{"text": "a"}, {"text": " "}]})
    assert_400(r, ["items", "1", "text"])
    assert r.json()["errors"][0]["msg"] == "text must not be empty"
    single = score_client.post("/forward", json={"text": " "}).json()["errors"][0]["msg"]
    assert single == "text must not be empty"
    r = score_client.post("/forward_batch", json={"items": [{"text": "a"}, {"text": "b", "x": 1}]})
    assert_400(r, ["items", "1", "x"])
    assert "Value error" not in r.text


# -- /v1: the same checks, OpenAI's error shape ----------------------------------------------------
def v1_400(r, param: str, says: str) -> None:
    assert r.status_code == 400, (r.status_code, r.text)
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param, err
    assert says in err["message"], err
    for internal in ("function-after", "list[", "Value error", "Traceback", "_encodable"):
        assert internal not in r.text, r.text


def raw_json(c, path: str, body) -> object:
    """Posted as JSON text (lone surrogates as escapes: httpx's json= cannot encode them)."""
    return c.post(path, content=json.dumps(body), headers={"content-type": "application/json"})


def test_v1_errors_name_plain_field_paths(client):
    """`param` is the field's path (`messages.0.content`), never pydantic's union tags
    (`messages.0.content.function-after[_encodable(), str]`)."""
    chat = "/v1/chat/completions"

    def msg(content) -> dict:
        return {"messages": [{"role": "user", "content": content}], "max_tokens": 1}

    v1_400(raw_json(client, chat, msg("\ud800")), "messages.0.content", "lone surrogate")
    parts = [{"type": "text", "text": "ok"}, {"type": "text", "text": "a\udfffb"}]
    v1_400(raw_json(client, chat, msg(parts)), "messages.0.content.1.text", "lone surrogate")
    v1_400(raw_json(client, chat, msg(5)), "messages.0.content", "a valid string or a valid list")
    bad_part = [{"type": "text", "text": 5}]
    v1_400(raw_json(client, chat, msg(bad_part)), "messages.0.content.0.text", "valid string")
    completions = "/v1/completions"
    v1_400(raw_json(client, completions, {"prompt": "\ud800"}), "prompt", "lone surrogate")
    v1_400(raw_json(client, completions, {"prompt": ["a", "\ud800"]}), "prompt", "lone surrogate")
    stop = {"prompt": "a", "max_tokens": 1, "stop": ["x", "\ud800"]}
    v1_400(raw_json(client, completions, stop), "stop.1", "lone surrogate")
    v1_400(raw_json(client, completions, {"prompt": "a", "stop": 5}), "stop", "a valid string")


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
@pytest.mark.parametrize(
    "body,says", [(DEEP, "nested more than"), (BIG_INT, "too many digits"), (b"\xff{}", "UTF-8")]
)
def test_v1_unparsable_bodies_are_400(client, path, body, says):
    r = client.post(path, content=body, headers={"content-type": "application/json"})
    v1_400(r, "body", says)


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
@pytest.mark.parametrize(
    "field", ["max_tokens", "temperature", "top_p", "n", "seed", "top_k", "repetition_penalty"]
)
def test_v1_numbers_are_not_booleans_and_are_finite(client, path, field):
    body = (
        {"prompt": "a"}
        if path == "/v1/completions"
        else {"messages": [{"role": "user", "content": "a"}]}
    )
    v1_400(raw_json(client, path, {**body, field: True}), field, "not a boolean")
    if field in ("temperature", "top_p", "repetition_penalty"):
        for value in (b"NaN", b"Infinity", b"-Infinity"):
            text = json.dumps(body)[:-1].encode() + b', "' + field.encode() + b'": ' + value + b"}"
            r = client.post(path, content=text, headers={"content-type": "application/json"})
            v1_400(r, field, "finite")


def test_reload_refuses_a_lone_surrogate_by_name(admin_client):
    r = raw_json(admin_client, "/admin/reload", {"version": "\ud800"})
    assert_400(r, ["version"])
    assert "lone surrogate" in r.json()["errors"][0]["msg"]  # our words, not the parser's


# -- one set of limits for both dialects -----------------------------------------------------------
def test_forward_and_v1_share_their_ranges_and_stop_limits(client):
    """The bounds are written once (ml_service/backend/schemas.py) and both dialects keep them:
    accepted at the edge, refused just past it."""
    from ml_service.backend import schemas

    edges = {
        "temperature": (schemas.MAX_TEMPERATURE, schemas.MAX_TEMPERATURE + 0.01),
        "repetition_penalty": (
            schemas.MAX_REPETITION_PENALTY,
            schemas.MAX_REPETITION_PENALTY + 0.01,
        ),
        "seed": (schemas.MAX_SEED, schemas.MAX_SEED + 1),
    }
    low = {
        "repetition_penalty": (schemas.MIN_REPETITION_PENALTY, schemas.MIN_REPETITION_PENALTY / 2)
    }
    n, chars = schemas.MAX_STOP_STRINGS, schemas.MAX_STOP_CHARS
    stops = {
        "stop": (
            [f"{i}" + "я" * (chars - 1) for i in range(n)],  # n strings of the longest length
            [f"{i}" for i in range(n + 1)],
        )
    }
    too_long = ["я" * (chars + 1)]
    for field, (ok, bad) in {**edges, **low, **stops}.items():
        forward = {"text": "а", "max_new_tokens": 1, field: ok}
        assert client.post("/forward", json=forward).status_code == 200, (field, ok)
        assert_400(client.post("/forward", json={**forward, field: bad}), [field])
        v1 = {"prompt": "а", "max_tokens": 1, field: ok}
        assert client.post("/v1/completions", json=v1).status_code == 200, (field, ok)
        v1_400(client.post("/v1/completions", json={**v1, field: bad}), field, "")
    for c, path, body in (
        (client, "/forward", {"text": "а"}),
        (client, "/v1/completions", {"prompt": "а"}),
    ):
        r = c.post(path, json={**body, "stop": too_long})
        assert r.status_code == 400 and f"1 to {chars} characters" in r.text, r.text
        r = c.post(path, json={**body, "stop": [str(i) for i in range(n + 1)]})
        assert r.status_code == 400 and f"at most {n} stop strings" in r.text, r.text
    # and the documents say the same
    sampling = client.get("/metadata").json()["sampling"]
    assert sampling["temperature"]["maximum"] == schemas.MAX_TEMPERATURE
    assert sampling["repetition_penalty"]["maximum"] == schemas.MAX_REPETITION_PENALTY
    doc = client.get("/openapi.json").json()
    forward_stop = doc["paths"]["/forward"]["post"]["requestBody"]["content"]["application/json"]
    forward_stop = forward_stop["schema"]["properties"]["stop"]["anyOf"][0]
    assert forward_stop["maxItems"] == n and forward_stop["items"]["maxLength"] == chars
    assert f"up to {n} strings of 1-{chars} characters" in json.dumps(doc)  # /v1's `stop`


def test_the_batch_body_of_the_score_service_is_documented_as_its_items(score_client):
    """/openapi.json describes each item of the score service's /forward_batch as the request it
    is (it was `{"type": "object", "additionalProperties": true}`)."""
    doc = score_client.get("/openapi.json").json()
    body = doc["paths"]["/forward_batch"]["post"]["requestBody"]["content"]["application/json"]
    item = body["schema"]["properties"]["items"]["items"]
    assert item["properties"]["text"]["type"] == "string" and item["required"] == ["text"]
    assert item["additionalProperties"] is False
    assert body["schema"]["required"] == ["items"]


# -- forms: our own parser, our own words, UTF-8 only ----------------------------------------------
def multipart(*parts: tuple[bytes, bytes], boundary: bytes = b"xyz") -> dict:
    """A request body of raw parts: (Content-Disposition parameters, bytes)."""
    body = b"".join(
        b"--"
        + boundary
        + b"\r\nContent-Disposition: form-data; "
        + disposition
        + b"\r\n\r\n"
        + data
        + b"\r\n"
        for disposition, data in parts
    )
    return {
        "content": body + b"--" + boundary + b"--\r\n",
        "headers": {"content-type": "multipart/form-data; boundary=" + boundary.decode()},
    }


def urlencoded(body: bytes) -> dict:
    return {"content": body, "headers": {"content-type": "application/x-www-form-urlencoded"}}


STARLETTE_WORDS = ("400:", "Too many", "Maximum number", "Invalid multipart", "Missing boundary")


@pytest.mark.parametrize("which", ["text-generation", "score"])
def test_malformed_forms_are_400_in_our_words(client, score_client, which):
    c = score_client if which == "score" else client
    two_files = multipart(
        (b'name="file"; filename="a.txt"', b"a"), (b'name="other"; filename="b.txt"', b"b")
    )
    cases = [
        (two_files, ["other"], "at most one file"),
        (urlencoded(b"&".join(b"f%d=1" % i for i in range(40))), ["body"], "at most 32 form"),
        (multipart(*[(b'name="f%d"' % i, b"1") for i in range(40)]), ["body"], "at most 32 form"),
        (
            {"content": b"x", "headers": {"content-type": "multipart/form-data"}},
            ["content-type"],
            "needs a boundary",
        ),
        (
            {"content": b"garbage", "headers": {"content-type": "multipart/form-data; boundary=x"}},
            ["body"],
            "malformed multipart body",
        ),
        (
            {
                **multipart((b'name="text"', b"a")),
                "content": multipart((b'name="text"', b"a"))["content"][:-9],
            },
            ["body"],
            "ends before its last boundary",
        ),
        (multipart((b'filename="a.txt"', b"a")), ["body"], "has no field name"),
        (multipart((b'name="text"', b"a"), (b'name="file"', b"b")), ["file"], "uploaded file"),
    ]
    for request, loc, says in cases:
        r = c.post("/forward", **request)
        assert_400(r, loc, says)
        assert not any(word in r.text for word in STARLETTE_WORDS), r.text
    # a form that is fine still works: 32 fields are allowed (unknown ones are then refused)
    r = c.post("/forward", **urlencoded(b"&".join(b"f%d=1" % i for i in range(32))))
    assert_400(r)
    assert "form fields" not in r.text


NOT_UTF8 = {
    "latin-1 bytes": b"\xff\xfe",
    "cp1251": "Москва".encode("cp1251"),
    "a surrogate, CESU-style": b"\xed\xa0\x80",
    "cut mid-character": "Мо".encode()[:3],
}


@pytest.mark.parametrize("case", list(NOT_UTF8))
def test_form_fields_must_be_utf8(client, score_client, case):
    """Starlette read such bytes as latin-1 (or U+FFFD) and answered 200 with mojibake; now the
    field is refused by name, in multipart and url-encoded forms alike, on both services."""
    raw = NOT_UTF8[case]
    escaped = "".join(f"%{b:02X}" for b in raw).encode()
    for c in (client, score_client):
        assert_400(c.post("/forward", **multipart((b'name="text"', raw))), ["text"], "UTF-8")
        assert_400(c.post("/forward", **urlencoded(b"text=" + raw)), ["text"], "UTF-8")
        assert_400(c.post("/forward", **urlencoded(b"text=" + escaped)), ["text"], "UTF-8")
    stop = multipart((b'name="text"', "Москва".encode()), (b'name="stop"', raw))
    assert_400(client.post("/forward", **stop), ["stop"], "not valid UTF-8")
    name = urlencoded(b"text=a&" + escaped + b"=1")
    assert_400(client.post("/forward", **name), ["body"], "name is not valid UTF-8")


def test_utf8_form_fields_arrive_as_sent(score_client):
    """The same text, sent as JSON, url-encoded (escaped or raw bytes) and multipart, is scored
    alike: the form parser hands over exactly the characters sent."""
    text = "Москва, «ёлка» + 1 & 2 = 3"
    expected = score_client.post("/forward", json={"text": text}).json()
    assert expected["num_bytes"] == len(text.encode())
    from urllib.parse import quote_plus

    forms = [
        urlencoded(b"text=" + quote_plus(text).encode()),
        urlencoded(
            b"text=" + text.replace("&", "%26").replace("+", "%2B").replace(" ", "+").encode()
        ),
        multipart((b'name="text"', text.encode())),
        multipart((b'name="file"; filename="t.txt"', text.encode())),
    ]
    for form in forms:
        r = score_client.post("/forward", **form)
        assert r.status_code == 200, r.text
        assert r.json()["tokens"] == expected["tokens"]


MALFORMED_JSON = {
    b'{"text": }': "column 10: a value was expected",
    b'{"text" "a"}': "a ':' was expected",
    b'{"text": "a" "b"}': "a ',' was expected",
    b"{text: 1}": "a key in double quotes was expected",
    b'{"text": "a': "a string that is never closed starts here",
    b'{"text": "\x01"}': "a control character inside a string must be escaped",
    b'{"text": "\\q"}': "invalid backslash escape",
    b'{"text": "\\u12"}': "invalid \\u escape",
    b'{"text": "a"} x': "more text after the JSON value",
    b"": "line 1, column 1: a value was expected",
}


def test_malformed_json_is_described_in_our_words(client):
    """The position, and the problem in our words (not Python's "Expecting value")."""
    for body, says in MALFORMED_JSON.items():
        headers = {"content-type": "application/json"}
        assert_400(client.post("/forward", content=body, headers=headers), ["body"], says)
        v1_400(client.post("/v1/completions", content=body, headers=headers), "body", says)
        for python_words in ("Expecting", "Unterminated", "Invalid", "Extra data", "delimiter"):
            assert python_words not in client.post("/forward", content=body, headers=headers).text


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
@pytest.mark.parametrize("ct", ["text/plain", None, "application/x-www-form-urlencoded"])
def test_v1_takes_json_only_as_forward_does(client, path, ct):
    """/v1 read any body as JSON whatever its content type (200 for text/plain or none); now a
    400 naming `content-type`, as /forward answers, in OpenAI's shape (issue 32, item 7)."""
    body = (
        {"prompt": "а", "max_tokens": 1}
        if path == "/v1/completions"
        else {"messages": [{"role": "user", "content": "а"}], "max_tokens": 1}
    )
    headers = {"content-type": ct} if ct else {}
    r = client.post(path, content=json.dumps(body), headers=headers)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "content-type" and err["type"] == "invalid_request_error", err
    assert (
        f"unsupported content type {ct or '(none)'!r}; {path} takes application/json"
        in (err["message"])
    )
    if ct != "application/x-www-form-urlencoded":  # (which /forward takes, and /v1 does not)
        forward = client.post("/forward", content=json.dumps({"text": "а"}), headers=headers)
        assert forward.status_code == 400
        assert forward.json()["errors"][0]["loc"] == ["content-type"]
    # JSON with a charset parameter is JSON
    r = client.post(
        path, content=json.dumps(body), headers={"content-type": "application/json; charset=utf-8"}
    )
    assert r.status_code == 200, r.text
