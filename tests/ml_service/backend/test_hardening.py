"""What an adversarial probe found, fixed: nothing reveals server paths or exception text, headers
are bounded, wrong keys are limited per address, the info routes can need keys, and a failed load
or an empty version says so."""

from __future__ import annotations

import shutil
import threading

import httpx
import pytest
from fastapi.testclient import TestClient

from lib.checkpoint import checkpoint_sha256
from ml_service.backend.app import create_app
from ml_service.services.text_generation import TextGenerationService
from ml_service.settings import Settings
from tests.helpers import CHECKPOINT, app_with, with_settings

SHORT = {"text": "Привет", "max_new_tokens": 4}


class AddressFromHeader:
    """Lets a test speak from another client address (`X-Test-Address`) through one TestClient."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            address = dict(scope["headers"]).get(b"x-test-address")
            if address:
                scope = {**scope, "client": (address.decode(), 50000)}
        await self.app(scope, receive, send)


@pytest.fixture
def versions(tmp_path):
    """v1 (a config.json: the test app serves the loaded session model as v1) and v3, broken."""
    root = tmp_path / "secret-models-root"
    (root / "v1").mkdir(parents=True)
    shutil.copy(CHECKPOINT / "config.json", root / "v1" / "config.json")
    (root / "v3").mkdir()
    (root / "v3" / "config.json").write_text("{not json")
    return root


def versions_app(service, settings, versions):
    return app_with(service, settings, models_dir=versions, model_version="v1", admin_token="adm")


ADMIN = {"Authorization": "Bearer adm"}


def default(name: str):
    return Settings.model_fields[name].default


# -- 1. what the service reveals ------------------------------------------------------------------
def test_metadata_names_the_checkpoint_and_its_hash_never_its_path(client, tmp_path):
    r = client.get("/metadata")
    m = r.json()
    assert str(CHECKPOINT) not in r.text and str(CHECKPOINT.resolve()) not in r.text
    assert m["source"] == CHECKPOINT.name  # the seed contract's key, now a name
    assert m["checkpoint"] == {"name": CHECKPOINT.name, "sha256": checkpoint_sha256(CHECKPOINT)}
    assert len(m["checkpoint"]["sha256"]) == 64
    # the hash follows the content, not the place: a copy hashes the same, a changed file not
    copy = tmp_path / "copy"
    shutil.copytree(CHECKPOINT, copy)
    assert checkpoint_sha256(copy) == m["checkpoint"]["sha256"]
    (copy / "tokenizer_config.json").write_text("{}")
    assert checkpoint_sha256(copy) != m["checkpoint"]["sha256"]


def test_a_failed_load_shows_no_path_or_exception_on_ready(settings, tmp_path):
    missing = tmp_path / "secret-dir" / "model"
    s = with_settings(settings, checkpoint=missing, background_load=False)
    with TestClient(create_app(s, service=TextGenerationService(s))) as c:
        r = c.get("/ready")
    assert r.status_code == 503 and r.json()["status"] == "failed"
    assert "failed to load" in r.json()["error"]
    for leak in ("secret-dir", str(tmp_path), "FileNotFoundError", "no checkpoint"):
        assert leak not in r.text, leak


def test_admin_errors_name_versions_but_show_no_paths(service, settings, versions):
    with TestClient(versions_app(service, settings, versions)) as c:
        broken = c.post("/admin/reload", json={"version": "v3"}, headers=ADMIN)
        assert broken.status_code == 400 and "'v3' failed to load" in broken.text
        unknown = c.post("/admin/reload", json={"version": "v9"}, headers=ADMIN)
        assert unknown.status_code == 400 and "available: v1, v3" in unknown.text
        shutil.rmtree(versions)
        gone = c.get("/admin/versions", headers=ADMIN)
        assert gone.status_code == 400 and "does not exist" in gone.text
        assert c.post("/forward", json=SHORT).status_code == 200  # v1 still serves
    for r in (broken, unknown, gone):
        for leak in ("secret-models-root", "JSONDecodeError", "Expecting property name"):
            assert leak not in r.text, (leak, r.text)


@pytest.mark.slow
def test_the_real_server_sends_no_server_header_and_bounds_headers(live_server):
    """Against the session's real server (tests/conftest.py): two reads of /health."""
    proc = live_server
    r = httpx.get(f"{proc.url}/health", timeout=30)
    assert r.status_code == 200 and "server" not in r.headers
    big = httpx.get(f"{proc.url}/health", headers={"X-Big": "a" * 64 * 1024}, timeout=30)
    assert big.status_code == 431 and "server" not in big.headers
    assert big.json()["detail"] == "request header fields too large"


def test_info_routes_need_a_key_when_asked(service, settings):
    paths = ("/metadata", "/metrics", "/docs", "/redoc", "/openapi.json")
    with TestClient(app_with(service, settings, api_keys="k", guard_info_routes=True)) as c:
        for path in paths:
            r = c.get(path)
            assert r.status_code == 401 and r.json()["detail"] == "unauthorized", path
            assert r.headers["www-authenticate"] == "Bearer"
            assert c.get(path, headers={"Authorization": "Bearer k"}).status_code == 200, path
        for path in ("/health", "/ready"):
            assert c.get(path).status_code == 200, path
    assert default("guard_info_routes") is False  # off by default: probes and scrapers work


# -- 2. headers and brute force -------------------------------------------------------------------
def test_oversized_headers_get_431_with_the_error_body(service, settings):
    assert default("max_header_bytes") == 32 * 1024
    with TestClient(app_with(service, settings, max_header_bytes=4096)) as c:
        assert c.get("/health", headers={"X-Pad": "a" * 3000}).status_code == 200
        r = c.post("/forward", json=SHORT, headers={"X-Pad": "a" * 5000})
        assert r.status_code == 431
        body = r.json()
        assert body["detail"] == "request header fields too large"
        assert body["errors"][0]["loc"] == ["headers"] and "4096" in body["errors"][0]["msg"]
        many = {f"X-H{i}": "b" * 100 for i in range(50)}  # the total counts, not one header
        assert c.get("/health", headers=many).status_code == 431
        metrics = c.get("/metrics").text
    assert 'ml_service_request_failures_total{reason="bad_request"} 2.0' in metrics
    with TestClient(app_with(service, settings)) as c:  # the default bounds them too
        assert c.get("/health", headers={"X-Big": "a" * 64 * 1024}).status_code == 431


def test_failed_authentications_are_limited_per_address(service, settings):
    app = app_with(
        service, settings, api_keys="good", admin_token="adm", auth_failure_limit="3/minute"
    )
    wrong, good = {"Authorization": "Bearer bad"}, {"Authorization": "Bearer good"}
    with TestClient(AddressFromHeader(app)) as c:
        codes = [c.post("/forward", json=SHORT, headers=wrong).status_code for _ in range(3)]
        assert codes == [401, 401, 401]
        r = c.post("/forward", json=SHORT, headers=wrong)
        assert r.status_code == 429 and 1 <= int(r.headers["retry-after"]) <= 60
        assert r.json()["errors"][0]["loc"] == ["authorization"]
        # blocked whatever it sends, until the window passes: a correct key, the admin token
        assert c.post("/forward", json=SHORT, headers=good).status_code == 429
        assert c.get("/admin/versions", headers=ADMIN).status_code == 429
        # another address is not affected
        other = {"X-Test-Address": "10.0.0.2"}
        assert c.post("/forward", json=SHORT, headers={**good, **other}).status_code == 200
        # wrong admin tokens count too, and block the API keys of that address
        admin_wrong = {"Authorization": "Bearer nope", **other}
        codes = [c.get("/admin/versions", headers=admin_wrong).status_code for _ in range(3)]
        assert codes == [401, 401, 401]
        assert c.post("/forward", json=SHORT, headers={**good, **other}).status_code == 429
        # a missing key is not a guess: it does not count
        third = {"X-Test-Address": "10.0.0.3"}
        assert all(c.post("/forward", json=SHORT, headers=third).status_code == 401 for _ in "1234")
        assert c.post("/forward", json=SHORT, headers={**good, **third}).status_code == 200
    assert default("auth_failure_limit") == "20/minute"


def test_requests_without_a_header_are_no_failed_authentication(service, settings):
    """Issue 32 item 2: 20 `/admin/*` requests without an `Authorization` header put the address
    on the failed-authentication limit (then 429 on `/forward` even with a valid key). A missing
    header is no guess: 401, not counted, for the admin token as for the API keys; wrong tokens
    still count and still reach the limit."""
    app = app_with(
        service, settings, api_keys="good", admin_token="adm", auth_failure_limit="20/minute"
    )
    good = {"Authorization": "Bearer good"}
    with TestClient(AddressFromHeader(app)) as c:
        for path in ("/admin/versions", "/admin/traffic") * 15:  # 30, over the limit of 20
            r = c.get(path)
            assert r.status_code == 401, (path, r.status_code)
            assert r.headers["www-authenticate"] == "Bearer"
            assert r.json()["errors"][0]["loc"] == ["authorization"]
        # a header that is not a bearer token is no token either
        assert c.get("/admin/versions", headers={"Authorization": "Basic x"}).status_code == 401
        assert c.post("/forward", json=SHORT).status_code == 401  # no API key: not counted
        assert c.post("/forward", json=SHORT, headers=good).status_code == 200
        assert c.get("/admin/versions", headers=ADMIN).status_code == 200
        # wrong admin tokens from another address still count: 20, then 429 even with a good key
        other = {"X-Test-Address": "10.0.0.9"}
        wrong = {"Authorization": "Bearer nope", **other}
        codes = [c.get("/admin/versions", headers=wrong).status_code for _ in range(20)]
        assert codes == [401] * 20
        assert c.get("/admin/versions", headers=wrong).status_code == 429
        assert c.post("/forward", json=SHORT, headers={**good, **other}).status_code == 429
        assert c.get("/admin/versions", headers={**ADMIN, **other}).status_code == 429


# -- 3. small things ------------------------------------------------------------------------------
def test_requests_to_a_model_that_failed_to_load_say_so(settings, tmp_path):
    s = with_settings(settings, checkpoint=tmp_path / "secret-dir", background_load=False)
    with TestClient(create_app(s, service=TextGenerationService(s))) as c:
        r = c.post("/forward", json=SHORT)
    assert r.status_code == 503
    body = r.json()
    assert body["detail"] == "the model failed to load"
    assert [e["loc"] for e in body["errors"]] == [["model"]]
    assert "secret-dir" not in r.text and "FileNotFoundError" not in r.text


def test_requests_while_the_model_loads_say_it_is_loading(service, settings):
    gate = threading.Event()

    class SlowToLoad(TextGenerationService):
        def warmup(self):
            gate.wait(30)
            super().warmup()

    s = with_settings(settings, background_load=True)
    with TestClient(create_app(s, service=SlowToLoad(s, inference=service))) as c:
        try:
            r = c.post("/forward", json=SHORT)
        finally:
            gate.set()
    assert r.status_code == 503 and r.headers["retry-after"]
    assert r.json()["detail"] == "model is not loaded yet"
    assert r.json()["errors"][0]["loc"] == ["model"] and "loading" in r.json()["errors"][0]["msg"]


@pytest.mark.parametrize("version", ["", ".", "..", "../v1", "v1/", "a\\b", "v\x001"])
def test_reload_refuses_an_empty_version_or_a_path(service, settings, versions, version):
    with TestClient(versions_app(service, settings, versions)) as c:
        r = c.post("/admin/reload", json={"version": version}, headers=ADMIN)
        assert r.status_code == 400, r.text
        assert r.json()["errors"][0]["loc"] == ["version"]
        assert c.get("/admin/versions", headers=ADMIN).json()["current"] == "v1"


def test_a_failed_reload_says_what_serves_now(service, settings, versions):
    """With a model serving, a reload that fails says it keeps serving; after a failed first
    load there is none, and the answer says so (it said "the current model keeps serving")."""
    with TestClient(versions_app(service, settings, versions)) as c:
        r = c.post("/admin/reload", json={"version": "v3"}, headers=ADMIN)
        assert r.status_code == 400 and "the current model keeps serving" in r.text, r.text
    s = with_settings(
        settings, models_dir=versions, model_version="v3", admin_token="adm", background_load=False
    )
    with TestClient(create_app(s, service=TextGenerationService(s))) as c:
        assert c.post("/forward", json=SHORT).json()["detail"] == "the model failed to load"
        r = c.post("/admin/reload", json={"version": "v3"}, headers=ADMIN)
        assert r.status_code == 400 and r.json()["errors"][0]["loc"] == ["version"], r.text
        msg = r.json()["errors"][0]["msg"]
        assert "keeps serving" not in msg and "no model is loaded" in msg, msg
        for leak in ("secret-models-root", "JSONDecodeError", "Expecting property name"):
            assert leak not in r.text, leak
