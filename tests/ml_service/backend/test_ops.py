"""Operations through the real app and model: metrics, access logs, probes, API keys, rate limits,
size limits, timeouts and model versions."""

from __future__ import annotations

import json
import logging
import threading

import pytest
from fastapi.testclient import TestClient

from lib.inference.decoder import GPT2SlotDecoder
from ml_service.backend.app import create_app
from ml_service.observability import access_log
from ml_service.services.text_generation import TextGenerationService
from tests.helpers import HANG_S, app_with, wait_for, with_settings

SHORT = {"text": "Привет", "max_new_tokens": 4}


class Lines(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines = []

    def emit(self, record):
        self.lines.append(json.loads(record.getMessage()))


class DecodeGate:
    """While closed, an engine's decoding thread waits before each decode step of the model, so
    a generation that reached the model stays in flight until the test opens the gate, however
    fast the machine. Other threads (a version loading and warming up) pass."""

    def __init__(self):
        self._open = threading.Event()
        self._open.set()
        self.holding = threading.Event()  # a decoding thread waits at the closed gate

    def close(self) -> None:
        self.holding.clear()
        self._open.clear()

    def open(self) -> None:
        self._open.set()

    def pass_through(self) -> None:
        if threading.current_thread().name == "generation-engine" and not self._open.is_set():
            self.holding.set()
            self._open.wait(HANG_S)


@pytest.fixture
def decode_gate(monkeypatch):
    gate = DecodeGate()
    original = GPT2SlotDecoder.decode

    def decode(self, *args, **kwargs):
        gate.pass_through()
        return original(self, *args, **kwargs)

    monkeypatch.setattr(GPT2SlotDecoder, "decode", decode)
    yield gate
    gate.open()


@pytest.fixture
def access_lines():
    handler = Lines()
    access_log.addHandler(handler)
    yield handler.lines
    access_log.removeHandler(handler)


# -- metrics and logs -----------------------------------------------------------------------------
def test_metrics_count_requests_tokens_and_latencies(client):
    for _ in range(3):
        assert client.post("/forward", json={**SHORT, "min_new_tokens": 4}).status_code == 200
    client.post("/forward", json={"text": ""})  # a 400
    text = client.get("/metrics").text
    names = [
        "ml_service_requests_total",
        "ml_service_request_failures_total",
        "ml_service_e2e_request_latency_seconds_bucket",
        "ml_service_request_queue_time_seconds_bucket",
        "ml_service_time_to_first_token_seconds_bucket",
        "ml_service_inter_token_latency_seconds_bucket",
        "ml_service_prompt_tokens_total",
        "ml_service_generation_tokens_total",
        "ml_service_num_requests_running",
        "ml_service_num_requests_waiting",
        "ml_service_batch_size_bucket",
        "ml_service_model_info",
    ]
    for name in names:
        assert name in text, name
    samples = {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }
    assert samples['ml_service_requests_total{route="/forward",status="200"}'] >= 3
    assert samples['ml_service_request_failures_total{reason="bad_request"}'] >= 1
    # the engine's metrics carry the version that served them (the checkpoint's name here)
    version = '{version="default"}'
    assert samples["ml_service_generation_tokens_total" + version] >= 12
    assert samples["ml_service_time_to_first_token_seconds_count" + version] >= 3
    assert samples["ml_service_inter_token_latency_seconds_count" + version] >= 9  # 3 gaps each
    assert samples["ml_service_num_requests_running"] == 0
    info = [k for k in samples if k.startswith("ml_service_model_info{")]
    assert info and 'model_id="ru-gpt-tiny"' in info[0] and 'device="cpu"' in info[0]


def test_access_log_is_one_json_line_per_request_with_request_id(client, access_lines):
    r = client.post("/forward", json=SHORT, headers={"X-Request-ID": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    made = client.get("/health").headers["x-request-id"]
    assert len(made) == 32  # made when the client sends none
    first, second = access_lines[-2:]
    assert first["request_id"] == "abc-123" and first["route"] == "/forward"
    assert first["status"] == 200 and first["latency_ms"] > 0
    assert first["prompt_tokens"] == r.json()["usage"]["prompt_tokens"]
    assert first["completion_tokens"] == r.json()["usage"]["completion_tokens"]
    assert "prompt" not in first  # prompts stay out of logs unless asked
    assert second["request_id"] == made and second["route"] == "/health"


def test_prompts_are_logged_only_when_enabled(service, settings, access_lines):
    with TestClient(app_with(service, settings, log_prompts=True)) as c:
        c.post("/forward", json=SHORT)
    assert access_lines[-1]["prompt"] == "Привет"


# -- probes ---------------------------------------------------------------------------------------
def test_ready_is_503_until_the_model_is_loaded_and_warm(service, settings):
    gate = threading.Event()

    class SlowToLoad(TextGenerationService):
        def warmup(self):
            gate.wait(HANG_S)
            super().warmup()

    s = with_settings(settings, background_load=True)
    app = create_app(s, service=SlowToLoad(s, inference=service))
    with TestClient(app) as c:
        assert c.get("/health").status_code == 200  # alive while loading
        r = c.get("/ready")
        assert r.status_code == 503 and r.json()["status"] == "loading"
        assert c.post("/forward", json=SHORT).status_code == 503
        gate.set()
        wait_for(lambda: c.get("/ready").status_code == 200, "ready after the warm-up")
        assert c.get("/ready").json() == {
            "status": "ready",
            "model": "ru-gpt-tiny",
            "version": "default",
            "error": None,
        }
        assert c.post("/forward", json=SHORT).status_code == 200


def test_a_model_that_fails_to_load_is_never_ready(settings, tmp_path):
    s = with_settings(settings, checkpoint=tmp_path, background_load=True)
    with TestClient(create_app(s)) as c:
        wait_for(lambda: c.get("/ready").json()["status"] != "loading", "the load ended")
        r = c.get("/ready")
        assert r.status_code == 503 and r.json()["status"] == "failed"
        assert "failed to load" in r.json()["error"] and str(tmp_path) not in r.text
        assert c.get("/health").status_code == 200


def failures(c: TestClient) -> dict[str, float]:
    prefix = "ml_service_request_failures_total{reason="
    return {
        line[len(prefix) + 1 : line.index('"}')]: float(line.rsplit(" ", 1)[1])
        for line in c.get("/metrics").text.splitlines()
        if line.startswith(prefix)
    }


def test_probes_wrong_paths_and_methods_are_not_counted_as_failures(settings, tmp_path):
    """docs/operate.md's metrics: /ready's 503, a 404 and a 405 are answers, not failed
    requests; a model request refused while no model is loaded is `not_ready`."""
    s = with_settings(settings, checkpoint=tmp_path, background_load=True)
    with TestClient(create_app(s)) as c:
        wait_for(lambda: c.get("/ready").json()["status"] != "loading", "the load ended")
        before = failures(c)
        assert c.get("/ready").status_code == 503
        assert c.get("/no-such-route").status_code == 404
        assert c.get("/forward").status_code == 405
        assert failures(c) == before
        assert c.post("/forward", json=SHORT).status_code == 503
        after = failures(c)
        assert after.pop("not_ready") == before.pop("not_ready", 0) + 1 and after == before


# -- keys, limits, timeouts -----------------------------------------------------------------------
def test_api_keys_guard_generation_but_not_probes(service, settings):
    with TestClient(app_with(service, settings, api_keys="k1,k2")) as c:
        assert c.post("/forward", json=SHORT).status_code == 401
        wrong = c.post("/forward", json=SHORT, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.headers["www-authenticate"] == "Bearer"
        assert wrong.json()["detail"] == "unauthorized"
        for key in ("k1", "k2"):
            ok = c.post("/forward", json=SHORT, headers={"Authorization": f"Bearer {key}"})
            assert ok.status_code == 200
        batch = c.post("/forward_batch", json={"texts": ["a"]})
        assert batch.status_code == 401
        for path in ("/health", "/ready", "/metadata", "/metrics"):
            assert c.get(path).status_code == 200, path


def test_admin_endpoints_are_closed_without_an_admin_token(client):
    r = client.post("/admin/reload", json={})
    assert r.status_code == 401 and "ML_SERVICE_ADMIN_TOKEN" in r.text
    assert client.get("/admin/versions").status_code == 401


def test_rate_limit_per_key_gives_429_with_retry_after(service, settings):
    with TestClient(app_with(service, settings, api_keys="a,b", rate_limit="2/minute")) as c:
        as_a = {"Authorization": "Bearer a"}
        codes = [c.post("/forward", json=SHORT, headers=as_a).status_code for _ in range(3)]
        assert codes == [200, 200, 429]
        r = c.post("/forward", json=SHORT, headers=as_a)
        assert r.status_code == 429 and 1 <= int(r.headers["retry-after"]) <= 60
        # another key has its own budget
        assert (
            c.post("/forward", json=SHORT, headers={"Authorization": "Bearer b"}).status_code == 200
        )


def test_body_size_limit_is_413_before_parsing(service, settings):
    with TestClient(app_with(service, settings, max_body_bytes=1000)) as c:
        big = json.dumps({"text": "а" * 2000})
        r = c.post("/forward", content=big, headers={"Content-Type": "application/json"})
        assert r.status_code == 413 and r.json()["detail"] == "request body too large"

        def chunks():  # no Content-Length: counted while reading
            for _ in range(4):
                yield b'{"text": "' + b"a" * 400

        r = c.post("/forward", content=chunks(), headers={"Content-Type": "application/json"})
        assert r.status_code == 413
        upload = {"file": ("p.txt", "а".encode() * 1000, "text/plain")}
        assert c.post("/forward", files=upload).status_code == 413  # a form, too


def test_a_slow_generation_times_out_with_504_and_frees_the_model(service, settings, decode_gate):
    """The model is held at the gate until the answer came, so the generation cannot finish
    within the timeout, however fast the machine; then its rows must leave the engine."""
    app = app_with(service, settings, request_timeout_s=0.05, max_batch_size=1)
    long_job = {"max_new_tokens": 250, "min_new_tokens": 250}
    with TestClient(app) as c:
        engine = app.state.deps.host.current.engine
        decode_gate.close()
        try:
            r = c.post("/forward_batch", json={**long_job, "texts": ["Москва"] * 8})
        finally:
            decode_gate.open()
        assert r.status_code == 504 and r.json()["detail"] == "generation timed out"
        # cancelled, not left running: the engine empties (the rest would take 8 x 250 tokens)
        wait_for(lambda: engine.running == engine.waiting == 0, "the engine emptied")
        registry = app.state.deps.metrics.registry
        tokens = registry.get_sample_value(
            "ml_service_generation_tokens_total", {"version": "default"}
        )
        assert tokens < 8 * 250, tokens
        decode_gate.close()
        try:
            s = c.post("/forward", json={**long_job, "text": "Москва", "stream": True})
        finally:
            decode_gate.open()
        assert s.status_code == 200 and "event: error" in s.text and "timed out" in s.text
        wait_for(lambda: engine.running == engine.waiting == 0, "the engine emptied")


# -- model versions -------------------------------------------------------------------------------
def test_reload_switches_versions_and_a_broken_one_leaves_the_old_serving(settings, models_dir):
    s = with_settings(settings, models_dir=models_dir, model_version="v2", admin_token="adm")
    admin = {"Authorization": "Bearer adm"}
    with TestClient(create_app(s)) as c:
        meta = c.get("/metadata").json()
        assert meta["version"] == "v2" and meta["model_id"] == "ru-gpt-tiny-v2"
        assert c.get("/admin/versions", headers=admin).json() == {
            "current": "v2",
            "versions": ["v1", "v2", "v3"],
        }
        assert c.post("/admin/reload", json={"version": "v1"}).status_code == 401
        r = c.post("/admin/reload", json={"version": "v1"}, headers=admin)
        assert r.status_code == 200, r.text
        assert r.json() == {
            "version": "v1",
            "model": "ru-gpt-tiny-v1",
            "previous_version": "v2",
            "previous_model": "ru-gpt-tiny-v2",
        }
        assert c.get("/metadata").json()["version"] == "v1"
        assert c.post("/forward", json=SHORT).json()["model"] == "ru-gpt-tiny-v1"

        bad = c.post("/admin/reload", json={"version": "v3"}, headers=admin)
        assert bad.status_code == 400 and "v3" not in c.get("/metadata").json()["version"]
        assert "'v3' failed to load" in bad.text  # says which (the log says why: no paths here)
        assert str(models_dir) not in bad.text
        unknown = c.post("/admin/reload", json={"version": "v9"}, headers=admin)
        assert unknown.status_code == 400 and "available: v1, v2, v3" in unknown.text
        assert c.post("/forward", json=SHORT).json()["model"] == "ru-gpt-tiny-v1"
        assert 'version="v1"' in c.get("/metrics").text


def test_in_flight_requests_finish_across_a_reload(settings, models_dir, decode_gate):
    """A request that is being generated on v2 when the reload to v1 is answered (its decoding
    waits at the gate until then) finishes on v2; the next one runs on v1."""
    s = with_settings(settings, models_dir=models_dir, model_version="v2", admin_token="adm")
    with TestClient(create_app(s)) as c:
        results = {}

        def long_request():
            try:
                results["r"] = c.post(
                    "/forward",
                    json={"text": "Москва", "max_new_tokens": 250, "min_new_tokens": 250},
                )
            except BaseException as e:  # reported below, not lost in the thread
                results["error"] = e

        decode_gate.close()
        worker = threading.Thread(target=long_request)
        worker.start()
        try:
            assert decode_gate.holding.wait(HANG_S), f"it never reached the model: {results}"
            admin = {"Authorization": "Bearer adm"}
            r = c.post("/admin/reload", json={"version": "v1"}, headers=admin)
            assert r.status_code == 200, r.text
            assert r.json()["previous_version"] == "v2"
            assert not results, "still in flight when the reload was answered"
        finally:
            decode_gate.open()
        worker.join(HANG_S)
        assert not worker.is_alive() and "error" not in results, results
        assert results["r"].status_code == 200
        assert results["r"].json()["usage"]["completion_tokens"] == 250
        assert results["r"].json()["model"] == "ru-gpt-tiny-v2"  # began on v2, finished there
        assert c.post("/forward", json=SHORT).json()["model"] == "ru-gpt-tiny-v1"
