"""Numbers must be numbers and booleans booleans, on every route with a body (issue 32, item 5:
`"seed": "5"`, `"max_new_tokens": "3"`, `"temperature": "0"`, `"stream": "yes"` or `1`,
`"cache": "no"`, a `logit_bias` value `true` and a split weight `true` were all answered 200). A
wrong type is a 400 naming the field, in the route's error shape; a form, which carries text,
reads each field from its text as strictly."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr

from ml_service.backend.app import create_app
from ml_service.backend.bodies import form_kinds
from ml_service.backend.schemas import ForwardRequest
from ml_service.services.text_generation import TextGenerationService

ONE = {"max_new_tokens": 1, "temperature": 0}
# (field, wrong value, what the message says it is)
WRONG = [
    ("seed", "5", "a string"),
    ("max_new_tokens", "3", "a string"),
    ("max_new_tokens", 3.0, "3.0"),
    ("max_new_tokens", True, "a boolean"),
    ("temperature", "0", "a string"),
    ("temperature", True, "a boolean"),
    ("top_p", [1], "an array"),
    ("top_k", None, "null"),
    ("cache", "no", "a string"),
    ("cache", 0, "an integer"),
]


def forward_400(r, loc: list[str], says: str) -> None:
    assert r.status_code == 400, (r.status_code, r.text)
    (error,) = r.json()["errors"]
    assert error["loc"] == loc and says in error["msg"], error


def openai_400(r, param: str, says: str) -> None:
    assert r.status_code == 400, (r.status_code, r.text)
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error", error
    assert error["param"] == param and says in error["message"], error


@pytest.fixture(scope="module")
def admin_client(service, settings):
    s = settings.model_copy(update={"admin_token": SecretStr("adm")})
    app = create_app(s, service=TextGenerationService(s, inference=service))
    headers = {"Authorization": "Bearer adm"}
    with TestClient(app, raise_server_exceptions=False, headers=headers) as c:
        yield c


# -- /forward and /forward_batch (JSON) ---------------------------------------------------------
@pytest.mark.parametrize("field,value,kind", [*WRONG, ("stream", "yes", "a string")])
def test_forward_takes_numbers_and_booleans_only_as_json_types(client, field, value, kind):
    r = client.post("/forward", json={"text": "Москва", **ONE, field: value})
    forward_400(r, [field], kind)


@pytest.mark.parametrize("value", [1, "yes", "true"])
def test_stream_is_a_boolean(client, value):
    r = client.post("/forward", json={"text": "Москва", **ONE, "stream": value})
    forward_400(r, ["stream"], "must be true or false")


@pytest.mark.parametrize("field,value,kind", WRONG)
def test_forward_batch_takes_numbers_and_booleans_only_as_json_types(client, field, value, kind):
    r = client.post("/forward_batch", json={"texts": ["Москва"], **ONE, field: value})
    forward_400(r, [field], kind)


def test_the_right_types_still_pass(client):
    """An integer is a number too (`"temperature": 0`), and booleans are JSON's."""
    body = {"text": "Москва", "max_new_tokens": 1, "temperature": 0, "top_p": 1, "seed": 5}
    r = client.post("/forward", json={**body, "stream": False, "cache": False})
    assert r.status_code == 200, r.text
    r = client.post("/forward_batch", json={"texts": ["Москва"], "repetition_penalty": 1, **ONE})
    assert r.status_code == 200, r.text


# -- /forward as a form: each field read from its text -------------------------------------------
def test_a_form_reads_each_field_by_its_type():
    kinds = form_kinds(ForwardRequest)
    assert kinds["seed"] == "integer" and kinds["temperature"] == "number"
    assert kinds["stream"] == "boolean" and kinds["stop"] == "array" and kinds["text"] == "string"


@pytest.mark.parametrize(
    "fields",
    [
        {"max_new_tokens": "1", "temperature": "0", "seed": "007", "cache": "false"},
        {"max_new_tokens": "1", "temperature": "0.0", "top_p": "1e0", "stream": "false"},
        {"max_new_tokens": "1", "temperature": "0", "repetition_penalty": "1.5E-1"},
    ],
)
def test_a_form_with_numbers_and_booleans_as_text_passes(client, fields):
    r = client.post("/forward", data={"text": "Москва", **fields})
    assert r.status_code == 200, r.text
    r = client.post(
        "/forward", files={"text": (None, "Москва"), **{k: (None, v) for k, v in fields.items()}}
    )
    assert r.status_code == 200, r.text


@pytest.mark.parametrize(
    "field,text,says",
    [
        ("max_new_tokens", "3.0", "must be an integer (decimal digits)"),
        ("max_new_tokens", " 3", "must be an integer"),
        ("max_new_tokens", "+3", "must be an integer"),
        ("max_new_tokens", "1_0", "must be an integer"),
        ("seed", "٣", "must be an integer"),  # Arabic-Indic three: int() reads it, we do not
        ("seed", "", "must be an integer"),
        ("seed", "1" * 4301, "must be an integer"),
        ("temperature", "nan", "must be a number"),
        ("temperature", "inf", "must be a number"),
        ("temperature", ".5", "must be a number"),
        ("temperature", "0x1", "must be a number"),
        ("stream", "yes", "must be true or false"),
        ("stream", "True", "must be true or false"),
        ("stream", "1", "must be true or false"),
        ("cache", "no", "must be true or false"),
    ],
)
def test_a_form_field_that_is_not_its_types_text_is_a_400(client, field, text, says):
    for form in (
        {"data": {"text": "Москва", field: text}},
        {"files": {"text": (None, "Москва"), field: (None, text)}},
    ):
        r = client.post("/forward", **form)
        forward_400(r, [field], says)
        assert ("1" * 100) not in r.text  # a long value is not echoed back


def test_a_form_number_past_float_range_is_refused_by_name(client):
    r = client.post("/forward", data={"text": "Москва", "temperature": "1e999"})
    forward_400(r, ["temperature"], "finite")


# -- /v1 ------------------------------------------------------------------------------------------
V1 = {
    "/v1/completions": {"prompt": "Москва", "max_tokens": 1},
    "/v1/chat/completions": {"messages": [{"role": "user", "content": "Привет"}], "max_tokens": 1},
}
V1_WRONG = [
    ("seed", "5", "seed", "a string"),
    ("max_tokens", "3", "max_tokens", "a string"),
    ("temperature", "0", "temperature", "a string"),
    ("stream", "yes", "stream", "a string"),
    ("stream", 1, "stream", "an integer"),
    ("cache", "no", "cache", "a string"),
    ("n", 2.0, "n", "2.0"),
    ("logit_bias", {"50": True}, "logit_bias.50", "a boolean"),
    ("logit_bias", {"50": "5"}, "logit_bias.50", "a string"),
    ("stream_options", {"include_usage": "yes"}, "stream_options.include_usage", "a string"),
    ("ignore_eos", 0, "ignore_eos", "an integer"),
    ("presence_penalty", False, "presence_penalty", "a boolean"),
]


@pytest.mark.parametrize("path", list(V1))
@pytest.mark.parametrize("field,value,param,kind", V1_WRONG)
def test_v1_takes_numbers_and_booleans_only_as_json_types(client, path, field, value, param, kind):
    openai_400(client.post(path, json={**V1[path], field: value}), param, kind)


def test_v1_fields_of_each_endpoint_are_strict(client):
    chat, completions = V1["/v1/chat/completions"], V1["/v1/completions"]
    openai_400(client.post("/v1/completions", json={**completions, "echo": 1}), "echo", "integer")
    r = client.post("/v1/completions", json={**completions, "logprobs": "1"})
    openai_400(r, "logprobs", "a string")
    r = client.post("/v1/chat/completions", json={**chat, "max_completion_tokens": "3"})
    openai_400(r, "max_completion_tokens", "a string")
    r = client.post("/v1/chat/completions", json={**chat, "logprobs": 1})
    openai_400(r, "logprobs", "must be true or false")
    r = client.post("/v1/completions", json={**completions, "prompt": [1, 2.0]})
    openai_400(r, "prompt", "integer")


def test_v1_takes_the_types_the_openai_sdk_sends(client):
    body = {"logit_bias": {"50": -100}, "temperature": 0, "top_p": 1, "seed": 5, "n": 1}
    for path, base in V1.items():
        r = client.post(path, json={**base, **body, "stream": False, "cache": False})
        assert r.status_code == 200, r.text


# -- /admin ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("weight,kind", [(True, "a boolean"), ("90", "a string"), (None, "null")])
def test_a_split_weight_must_be_a_number(admin_client, weight, kind):
    r = admin_client.post("/admin/traffic", json={"split": {"v1": weight, "v2": 10}})
    forward_400(r, ["split", "v1"], f"must be a number, not {kind}")


def test_integer_weights_pass_the_schema(admin_client):
    """(This server has no versions: the split is refused for that, after its types passed.)"""
    r = admin_client.post("/admin/traffic", json={"split": {"v1": 90, "v2": 10.5}})
    forward_400(r, ["split"], "ML_SERVICE_MODELS_DIR")


def test_a_reload_version_is_a_string(admin_client):
    r = admin_client.post("/admin/reload", json={"version": 5})
    forward_400(r, ["version"], "valid string")
