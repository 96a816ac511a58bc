"""The HTTP API through the real app and the real committed model."""

from __future__ import annotations

import contextlib
import json

import pytest
from fastapi.testclient import TestClient

from lib.inference import InferenceService
from ml_service.backend.app import create_app
from ml_service.backend.errors import MODEL_FAILED
from ml_service.services.text_generation import TextGenerationService
from tests.helpers import is_russian, read_sse

GREEDY = {"temperature": 0, "max_new_tokens": 16}


def test_health(client):
    r = client.get("/health")
    assert r.status_code == 200 and r.json() == {"status": "ok"}


def test_metadata_describes_model_limits_and_training(client, service):
    m = client.get("/metadata").json()
    assert m["model_id"] == service.model_id
    assert m["parameters"] == sum(p.numel() for p in service.model.parameters())
    assert m["context_length"] == service.model.config.n_positions
    assert m["vocab_size"] == service.model.config.vocab_size
    assert m["dtype"] == "float32" and m["device"] == "cpu"
    assert m["random_baseline"] is False and m["warning"] is None
    assert m["limits"]["max_texts"] == 8
    assert {"val_loss", "val_bits_per_byte", "steps", "tokens_seen"} <= set(m["training"])
    assert m["service_version"]


def test_forward_json_returns_russian_text(client, service):
    r = client.post("/forward", json={"text": "Привет, мир!", "max_new_tokens": 24, "seed": 1})
    assert r.status_code == 200, r.text
    body = r.json()
    assert is_russian(body["text"]), body["text"]
    assert body["finish_reason"] in {"length", "eos", "stop"}
    assert body["model"] == service.model_id
    u = body["usage"]
    assert u["prompt_tokens"] == service.count_tokens(["Привет, мир!"])[0]
    assert (
        1 <= u["completion_tokens"] <= 24
        and u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]
    )


def test_forward_multipart_text_field_equals_json(client):
    j = client.post("/forward", json={"text": "Москва", **GREEDY}).json()
    form = {"text": "Москва", "temperature": "0", "max_new_tokens": "16"}
    m = client.post("/forward", data=form)
    assert m.status_code == 200, m.text
    assert m.json()["text"] == j["text"]


def test_forward_multipart_file_upload(client):
    j = client.post("/forward", json={"text": "Он открыл дверь и", **GREEDY}).json()
    r = client.post(
        "/forward",
        files={"file": ("prompt.txt", "Он открыл дверь и".encode(), "text/plain")},
        data={"temperature": "0", "max_new_tokens": "16"},
    )
    assert r.status_code == 200, r.text
    assert r.json()["text"] == j["text"]


def test_forward_batch_keeps_order_and_matches_single_requests(client):
    texts = ["Привет, мир!", "Москва", "Он открыл дверь и", "В начале было"]
    batch = client.post("/forward_batch", json={"texts": texts, **GREEDY})
    assert batch.status_code == 200, batch.text
    results = batch.json()["results"]
    assert len(results) == len(texts)
    singles = [client.post("/forward", json={"text": t, **GREEDY}).json()["text"] for t in texts]
    assert [r["text"] for r in results] == singles


def test_seed_gives_same_output_and_other_seed_differs(client):
    req = {"text": "В начале было", "max_new_tokens": 24, "temperature": 1.0, "seed": 42}
    a, b = (client.post("/forward", json=req).json()["text"] for _ in range(2))
    assert a == b
    others = {client.post("/forward", json={**req, "seed": s}).json()["text"] for s in (1, 2, 3)}
    assert len(others | {a}) > 1


def test_stop_string_ends_generation(client):
    full = client.post(
        "/forward", json={"text": "Москва", "temperature": 0, "max_new_tokens": 24}
    ).json()["text"]
    stop = full.strip()[len(full.strip()) // 2 :][:3]
    r = client.post(
        "/forward", json={"text": "Москва", "temperature": 0, "max_new_tokens": 24, "stop": [stop]}
    )
    body = r.json()
    assert body["finish_reason"] == "stop"
    assert stop not in body["text"] and full.startswith(body["text"])


BAD_REQUESTS = {
    "malformed json": dict(content=b'{"text": "x",', headers={"Content-Type": "application/json"}),
    "json array": dict(json=["Привет"]),
    "wrong content type": dict(content="Привет".encode(), headers={"Content-Type": "text/plain"}),
    "no content type": dict(content=b"{}"),
    "missing text": dict(json={"max_new_tokens": 5}),
    "empty text": dict(json={"text": "   "}),
    "text not a string": dict(json={"text": 123}),
    "max_new_tokens not int": dict(json={"text": "a", "max_new_tokens": "many"}),
    "max_new_tokens zero": dict(json={"text": "a", "max_new_tokens": 0}),
    "max_new_tokens over limit": dict(json={"text": "a", "max_new_tokens": 100000}),
    "min_new_tokens above max": dict(json={"text": "a", "min_new_tokens": 9, "max_new_tokens": 4}),
    "negative temperature": dict(json={"text": "a", "temperature": -1}),
    "top_p zero": dict(json={"text": "a", "top_p": 0}),
    "top_k negative": dict(json={"text": "a", "top_k": -3}),
    "negative seed": dict(json={"text": "a", "seed": -1}),
    "stop not a list": dict(json={"text": "a", "stop": 5}),
    "empty stop string": dict(json={"text": "a", "stop": [""]}),
    "unknown field": dict(json={"text": "a", "temprature": 0.5}),
    "text over char limit": dict(json={"text": "а" * 2001}),
    "prompt longer than context": dict(json={"text": "слово " * 1500}),
    "non-utf8 file": dict(files={"file": ("p.txt", "Привет".encode("cp1251"), "text/plain")}),
    "oversized file": dict(files={"file": ("p.txt", ("а" * 5000).encode(), "text/plain")}),
    "text and file": dict(data={"text": "a"}, files={"file": ("p.txt", b"b", "text/plain")}),
    "form with bad number": dict(data={"text": "a", "max_new_tokens": "x"}),
    "empty form": dict(data={"other": "1"}, files={"x": ("p.txt", b"b", "text/plain")}),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_forward_requests_get_400_with_reasons(client, case):
    r = client.post("/forward", **BAD_REQUESTS[case])
    assert r.status_code == 400, (case, r.status_code, r.text)
    body = r.json()
    assert body["detail"] == "bad request"
    assert body["errors"] and all(e["msg"] for e in body["errors"])
    assert "Traceback" not in r.text


BAD_BATCHES = {
    "too many texts": {"texts": ["a"] * 9},
    "empty list": {"texts": []},
    "empty text in list": {"texts": ["a", " "]},
    "texts not a list": {"texts": "a"},
    "missing texts": {"text": "a"},
    "bad parameter": {"texts": ["a"], "temperature": "hot"},
    "prompt too long": {"texts": ["a", "слово " * 1500]},
}


@pytest.mark.parametrize("case", list(BAD_BATCHES))
def test_bad_batch_requests_get_400(client, case):
    r = client.post("/forward_batch", json=BAD_BATCHES[case])
    assert r.status_code == 400, (case, r.text)
    assert r.json()["detail"] == "bad request" and r.json()["errors"]


def test_batch_rejects_non_json(client):
    r = client.post("/forward_batch", data={"texts": "a"})
    assert r.status_code == 400


def test_no_422_anywhere(client):
    """FastAPI's default 422 must never reach a client, on any route."""
    for path in ("/forward", "/forward_batch"):
        for payload in ({}, {"x": 1}, {"text": None, "texts": None}):
            assert client.post(path, json=payload).status_code == 400


@contextlib.contextmanager
def broken_model_client(service, settings, model_failure):
    """A client of an app whose model fails inside generation once the app is up (its warm-up at
    start-up passes, as a GPU that fails later would)."""
    app = create_app(settings, service=TextGenerationService(settings, inference=service))
    with TestClient(app, raise_server_exceptions=False) as c:
        model_failure["on"] = True
        yield c


def test_model_failure_returns_403_without_traceback(service, settings, model_failure):
    with broken_model_client(service, settings, model_failure) as c:
        for r in (
            c.post("/forward", json={"text": "Привет"}),
            c.post("/forward_batch", json={"texts": ["Привет", "Мир"]}),
        ):
            assert r.status_code == 403
            assert r.json() == {"detail": MODEL_FAILED}
            assert "CUDA" not in r.text and "Traceback" not in r.text
        # bad input is still a 400, checked before the model is touched
        assert c.post("/forward", json={"text": ""}).status_code == 400
        # the service keeps serving after a failure
        assert c.get("/health").status_code == 200


def test_unexpected_error_is_500_without_traceback(service, settings):
    class Buggy(TextGenerationService):
        def postprocess(self, output, request):
            raise KeyError("secret internals")

    app = create_app(settings, service=Buggy(settings, inference=service))
    with TestClient(app, raise_server_exceptions=False) as c:
        r = c.post("/forward", json={"text": "Привет"})
    assert r.status_code == 500 and r.json() == {"detail": "internal server error"}
    assert "secret" not in r.text


def test_docs_and_openapi_describe_both_body_types(client):
    assert client.get("/docs").status_code == 200
    spec = client.get("/openapi.json").json()
    content = spec["paths"]["/forward"]["post"]["requestBody"]["content"]
    assert {"application/json", "multipart/form-data"} <= set(content)
    assert "file" in content["multipart/form-data"]["schema"]["properties"]
    assert json.dumps(spec)  # serialisable


def test_random_baseline_is_flagged_loudly(settings, service):
    baseline = InferenceService.random_baseline("tiny", tokenizer_path=service.source)
    app = create_app(settings, service=TextGenerationService(settings, inference=baseline))
    with TestClient(app) as c:
        m = c.get("/metadata").json()
    assert m["random_baseline"] is True and "RANDOM" in m["warning"]


# -- streaming (Server-Sent Events) ---------------------------------------------------------------
def test_stream_sends_pieces_then_the_whole_response(client):
    req = {"text": "Привет, мир!", "max_new_tokens": 32, "min_new_tokens": 32, "seed": 9}
    plain = client.post("/forward", json=req).json()
    with client.stream("POST", "/forward", json={**req, "stream": True}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        r.read()
    events = read_sse(r.text)
    names = [name for name, _ in events]
    assert names[-1] == "done" and set(names[:-1]) == {"token"} and len(names) > 5
    done = events[-1][1]
    assert done == plain  # the same response as without streaming
    assert "".join(data["text"] for name, data in events[:-1]) == done["text"]
    assert is_russian(done["text"])


def test_stream_works_from_a_form_too(client):
    form = {"text": "Москва", "temperature": "0", "max_new_tokens": "8", "stream": "true"}
    r = client.post("/forward", data=form)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    assert read_sse(r.text)[-1][0] == "done"


def test_stream_with_bad_input_is_a_plain_400(client):
    r = client.post("/forward", json={"text": " ", "stream": True})
    assert r.status_code == 400 and r.json()["detail"] == "bad request"


def test_stream_reports_a_model_failure_as_an_error_event(service, settings, model_failure):
    with broken_model_client(service, settings, model_failure) as c:
        r = c.post("/forward", json={"text": "Привет", "stream": True})
    assert r.status_code == 200
    assert read_sse(r.text) == [("error", {"detail": MODEL_FAILED})]
    assert "Traceback" not in r.text and "CUDA" not in r.text


def test_full_queue_is_a_503_with_retry_after(service, settings):
    """Refused at the edge, before any model work, when the queue cannot take the request."""
    app = create_app(settings, service=TextGenerationService(settings, inference=service))
    with TestClient(app, raise_server_exceptions=False) as c:
        engine = app.state.deps.host.current.engine
        engine.max_queue = 0  # nothing may wait
        for path, body in (("/forward", {"text": "a"}), ("/forward_batch", {"texts": ["a"]})):
            r = c.post(path, json=body)
            assert r.status_code == 503, r.text
            assert r.headers["retry-after"] == "1" and r.json()["errors"]
        engine.max_queue = 4
        assert c.post("/forward", json={"text": "a", "max_new_tokens": 2}).status_code == 200
