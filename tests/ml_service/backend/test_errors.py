"""The error map (ml_service/backend/errors.py): every exception the routes meet becomes one
status there, the classes carry their statuses, and the docs that list them (the routes'
OpenAPI `responses`, the error table of docs/reference/errors.md) are generated from or checked
against them."""

from __future__ import annotations

import re
import threading
from contextlib import contextmanager

import httpx
import pytest
import uvicorn
from fastapi import FastAPI

from lib.inference import EngineStopped, QueueFull
from lib.presets import REPO_ROOT
from ml_service.backend import errors
from ml_service.backend.app import create_app
from ml_service.backend.openai_protocol import SamplingRequest
from ml_service.backend.openai_serving import OpenAIServing
from ml_service.hosting import ReloadFailed, VersionNotFound, VersionNotLoaded
from ml_service.shutdown import SHUTTING_DOWN
from ml_service.traffic import BadSplit
from tests.helpers import free_port, wait_for

# the docs' error table, generated from this map (docs/generate_reference.py)
ERRORS_PAGE = REPO_ROOT / "docs" / "reference" / "errors.md"
# answers nobody reads (the client is gone), and Starlette's own 404/405 (any status)
UNDOCUMENTED = {errors.ClientDisconnected, errors.HTTPError}


def all_error_classes() -> set[type[errors.ServiceError]]:
    found, todo = set(), [errors.ServiceError]
    while todo:
        cls = todo.pop()
        found.add(cls)
        todo.extend(cls.__subclasses__())
    return found


@pytest.fixture(scope="module")
def openapi(settings) -> dict:
    return create_app(settings).openapi()  # no lifespan: nothing is loaded


def statuses(openapi: dict, path: str, method: str) -> set[int]:
    return {int(s) for s in openapi["paths"][path][method]["responses"] if s != "200"}


def expected(group, openai: bool = False) -> set[int]:
    return {(c.openai_status or c.status_code) if openai else c.status_code for c in group}


@pytest.mark.parametrize(
    ("path", "method", "group", "openai"),
    [
        ("/forward", "post", errors.MODEL_ROUTE_ERRORS, False),
        ("/forward_batch", "post", errors.MODEL_ROUTE_ERRORS, False),
        ("/metadata", "get", errors.INFO_ROUTE_ERRORS, False),
        ("/v1/completions", "post", errors.MODEL_ROUTE_ERRORS, True),
        ("/v1/chat/completions", "post", errors.MODEL_ROUTE_ERRORS, True),
        ("/v1/models", "get", errors.MODEL_ROUTE_ERRORS, True),
        ("/admin/reload", "post", errors.ADMIN_ROUTE_ERRORS, False),
        ("/admin/versions", "get", errors.ADMIN_ROUTE_ERRORS, False),
        ("/admin/traffic", "post", errors.ADMIN_ROUTE_ERRORS, False),
        ("/ready", "get", (errors.Unready,), False),
    ],
)
def test_each_route_documents_the_statuses_of_the_errors_it_can_raise(
    openapi, path, method, group, openai
):
    assert statuses(openapi, path, method) == expected(group, openai)


def test_the_404_for_a_version_pin_and_the_431_are_documented(openapi):
    """The hand-written tables had drifted: neither was listed for /forward."""
    forward = openapi["paths"]["/forward"]["post"]["responses"]
    assert "X-Model-Version" in forward["404"]["description"]
    assert "HEADER_BYTES" in forward["431"]["description"]
    assert "(`Retry-After`)" in forward["503"]["description"]
    v1 = openapi["paths"]["/v1/completions"]["post"]["responses"]
    assert v1["500"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/OpenAIErrorResponse"
    )
    assert "403" not in v1  # the model's failure is a 500 on /v1


def test_every_error_class_belongs_to_a_documented_group():
    grouped = {
        *errors.MODEL_ROUTE_ERRORS,
        *errors.INFO_ROUTE_ERRORS,
        *errors.ADMIN_ROUTE_ERRORS,
        errors.Unready,
    }
    assert all_error_classes() - UNDOCUMENTED <= grouped
    assert all(c.when for c in all_error_classes())


def test_the_error_table_of_the_docs_lists_every_status():
    text = ERRORS_PAGE.read_text(encoding="utf-8")
    table = text[text.index("\n## Statuses\n") :].split("\n## ")[1]
    listed = {int(s) for s in re.findall(r"^\| \**(\d{3})", table, flags=re.M)}
    documented = all_error_classes() - UNDOCUMENTED
    assert {c.status_code for c in documented} | {
        c.openai_status for c in documented if c.openai_status
    } <= listed


def test_the_app_description_lists_the_statuses(settings):
    description = create_app(settings).description
    for status in expected(errors.MODEL_ROUTE_ERRORS):
        assert f"- {status}: " in description


@pytest.mark.parametrize(
    ("exc", "answer", "status", "loc", "says"),
    [
        (VersionNotLoaded("version 'v9' is not loaded here", loc="model"), errors.ModelNotFound, 404, "model", "'v9'"),
        (VersionNotFound("unknown version 'v9'"), errors.BadRequest, 400, "version", "unknown"),
        (ReloadFailed("version 'v3' failed to load", loc="split"), errors.BadRequest, 400, "split", "'v3'"),
        (BadSplit("'v1' is not version=weight"), errors.BadRequest, 400, "split", "in force stays"),
    ],
)  # fmt: skip
def test_hosting_and_traffic_errors_are_mapped_in_one_place(exc, answer, status, loc, says):
    error = errors.as_service_error(exc)
    assert type(error) is answer and error.status_code == status
    assert error.errors[0]["loc"] == [loc] and says in error.errors[0]["msg"]


def test_the_readiness_probe_answers_its_own_body():
    error = errors.Unready({"status": "loading", "model": None, "version": None, "error": None})
    response = error.response("/ready")
    assert response.status_code == 503 and b'"status":"loading"' in response.body


# -- a bug is a JSON 500, and the connection stays ----------------------------------------------
@contextmanager
def served(app):
    """`app` behind a real uvicorn (in a thread of this process, so tests can plant bugs in it):
    its URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for(lambda: server.started, "the server started")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


def test_a_bug_anywhere_is_a_json_500_and_the_connection_stays(caplog):
    """Starlette's server-error middleware answers an unhandled exception, then raises it again;
    uvicorn then closed the connection, and a pooled client's next requests on it failed with
    `ReadError` (issue 32: a `logit_bias` key int() refused). `KeepConnection` ends it there."""
    app = FastAPI()
    errors.install_error_handlers(app)
    clients = []  # the client address (port) of every request the server saw

    @app.middleware("http")
    async def note_and_break(request, call_next):
        clients.append(request.client.port)
        if request.url.path == "/middleware-bug":
            raise RuntimeError("a bug in a middleware")
        return await call_next(request)

    @app.get("/route-bug")
    @app.get("/v1/route-bug")
    async def route_bug():
        raise ValueError("a bug in a route")  # as int("²") was

    @app.get("/ok")
    async def ok():
        return {"ok": True}

    with served(app) as url, httpx.Client(base_url=url, timeout=10) as c:
        r = c.get("/route-bug")
        assert r.status_code == 500 and r.json() == {"detail": "internal server error"}
        r = c.get("/v1/route-bug")  # OpenAI's body
        assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
        r = c.get("/middleware-bug")
        assert r.status_code == 500 and r.json() == {"detail": "internal server error"}
        for _ in range(20):
            assert c.get("/ok").json() == {"ok": True}
    assert len(clients) == 23 and len(set(clients)) == 1, clients  # one connection throughout
    logged = [r for r in caplog.records if r.getMessage().startswith("unhandled error on GET")]
    assert len(logged) == 3 and all(r.exc_info for r in logged)  # each bug once, with traceback


def test_a_bug_in_a_v1_route_keeps_the_connection_of_the_model_routes(settings, monkeypatch):
    """The whole app: a request that meets a bug in /v1, then 20 /forward on the same
    connection."""

    def broken(*args, **kwargs):
        raise ValueError("invalid literal for int() with base 10: '²'")

    monkeypatch.setattr(SamplingRequest, "params", broken)
    body = {"prompt": "Привет", "max_tokens": 1}
    with served(create_app(settings)) as url, httpx.Client(base_url=url, timeout=30) as c:
        r = c.post("/v1/completions", json=body)
        assert r.status_code == 500, r.text
        assert r.json()["error"] == {
            "message": "internal server error",
            "type": "server_error",
            "param": None,
            "code": None,
        }
        for _ in range(20):
            r = c.post("/forward", json={"text": "Привет", "max_new_tokens": 1})
            assert r.status_code == 200, r.text


def test_the_shutdown_message_says_it_once_and_other_messages_are_unchanged():
    """/v1 joins the detail and the first error's message: the shutdown's are the same words,
    which read "the service is shutting down: the service is shutting down" (issue 32, item 7)."""
    shutdown = errors.as_service_error(EngineStopped(SHUTTING_DOWN))
    assert shutdown.openai_body()["error"] == {
        "message": "the service is shutting down",
        "type": "server_error",
        "param": "queue",
        "code": None,
    }
    assert shutdown.body() == {  # /forward's body is unchanged
        "detail": "the service is shutting down",
        "errors": [{"loc": ["queue"], "msg": "the service is shutting down"}],
    }
    stopped = errors.as_service_error(EngineStopped("the engine stopped"))
    assert stopped.openai_body()["error"]["message"] == (
        "the service is shutting down: the engine stopped"
    )
    full = errors.as_service_error(QueueFull("the queue holds 64 requests"))
    assert full.openai_body()["error"]["message"] == (
        "the service is at capacity; retry later: the queue holds 64 requests"
    )
    bad = errors.BadRequest.one("n", "must be <= 16")
    assert bad.openai_body()["error"]["message"] == "bad request: must be <= 16"


def test_a_v1_request_ended_by_the_shutdown_hears_it_once(client, monkeypatch):
    async def stopped(*args, **kwargs):
        raise EngineStopped(SHUTTING_DOWN)

    monkeypatch.setattr(OpenAIServing, "generate", stopped)
    r = client.post("/v1/completions", json={"prompt": "а", "max_tokens": 1})
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert r.json()["error"]["message"] == "the service is shutting down"
