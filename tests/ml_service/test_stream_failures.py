"""Failures that happen after a stream has started (its status is already 200) are counted in
`ml_service_request_failures_total` by reason, and the end of the shutdown grace answers what is
left (503 with Retry-After, a stream's `error` event) instead of leaving it to be cut off."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
from types import SimpleNamespace

import httpx
import pytest
from fastapi.testclient import TestClient

from lib.inference import EngineStopped
from lib.inference.micro_batch import MicroBatcher
from ml_service.backend.errors import MODEL_FAILED
from ml_service.services.text_generation import TextGenerationService
from ml_service.shutdown import SHUTTING_DOWN, ShutdownGrace
from tests.helpers import app_with, read_sse, wait_for

LONG = {"text": "Москва", "max_new_tokens": 250, "min_new_tokens": 250}


def failures(app) -> dict[str, float]:
    metrics = app.state.deps.metrics
    return {
        s.labels["reason"]: s.value
        for family in metrics.registry.collect()
        if family.name == "ml_service_request_failures"
        for s in family.samples
        if s.name.endswith("_total")
    }


async def leave_mid_stream(app, body: dict) -> list[dict]:
    """POST `body` to /forward straight through ASGI; hang up after the first `token` event."""
    raw = json.dumps(body).encode()
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/forward",
        "raw_path": b"/forward",
        "query_string": b"",
        "root_path": "",
        "headers": [
            (b"host", b"testserver"),
            (b"content-type", b"application/json"),
            (b"content-length", str(len(raw)).encode()),
        ],
        "client": ("127.0.0.1", 50000),
        "server": ("testserver", 80),
    }
    gone = asyncio.Event()
    request_sent = False
    messages = []

    async def receive():
        nonlocal request_sent
        if not request_sent:
            request_sent = True
            return {"type": "http.request", "body": raw, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        messages.append(message)
        if b"event: token" in message.get("body", b""):
            gone.set()

    await app(scope, receive, send)
    return messages


# -- failures of started streams are counted ------------------------------------------------------
def test_a_stream_that_times_out_counts_a_timeout(service, settings):
    app = app_with(service, settings, request_timeout_s=0.05, max_batch_size=1)
    with TestClient(app) as c:
        before = failures(app).get("timeout", 0)
        r = c.post("/forward", json={**LONG, "stream": True})
        assert r.status_code == 200
        assert read_sse(r.text)[-1] == ("error", {"detail": "timed out after 0.05 s"})
        assert failures(app).get("timeout", 0) == before + 1


def test_a_client_leaving_mid_stream_counts_a_cancellation(service, settings):
    app = app_with(service, settings, max_batch_size=1)
    with TestClient(app) as c:
        before = failures(app)
        # asyncio.run finalizes the abandoned stream before it returns
        messages = asyncio.run(leave_mid_stream(app, {**LONG, "stream": True}))
        assert messages[0]["status"] == 200
        assert not any(b"event: done" in m.get("body", b"") for m in messages)
        engine = app.state.deps.host.current.engine
        wait_for(lambda: engine.running == engine.waiting == 0, "the cancelled row to leave")
        after = failures(app)
        assert after.get("cancelled", 0) == before.get("cancelled", 0) + 1
        assert sum(after.values()) == sum(before.values()) + 1  # nothing else counted
        assert c.post("/forward", json={"text": "Привет", "max_new_tokens": 4}).status_code == 200


def test_a_stream_the_model_fails_counts_a_model_error(service, settings, model_failure):
    app = app_with(service, settings)
    with TestClient(app, raise_server_exceptions=False) as c:
        model_failure["on"] = True
        before = failures(app).get("model_error", 0)
        r = c.post("/forward", json={"text": "Привет", "stream": True})
        assert read_sse(r.text) == [("error", {"detail": MODEL_FAILED})]
        assert failures(app).get("model_error", 0) == before + 1


def test_a_finished_stream_counts_no_failure(client):
    app = client.app
    before = failures(app)
    r = client.post("/forward", json={"text": "Привет", "max_new_tokens": 4, "stream": True})
    assert read_sse(r.text)[-1][0] == "done"
    assert failures(app) == before


# -- the end of the shutdown grace ----------------------------------------------------------------
def test_an_aborted_engine_answers_503_json_and_ends_streams_with_an_error_event(service, settings):
    """What `ShutdownGrace` does when the grace ends: the engine ends every queued and running
    request with EngineStopped; JSON callers get 503 with Retry-After, streams an `error` event,
    and each counts one `shutdown` failure."""
    app = app_with(service, settings, max_batch_size=1)
    n_json, n_streams = 3, 2
    with TestClient(app) as c:
        engine = app.state.deps.host.current.engine
        before = failures(app).get("shutdown", 0)

        async def scenario():
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                calls = [client.post("/forward", json=LONG) for _ in range(n_json)]
                calls += [
                    client.post("/forward", json={**LONG, "stream": True}) for _ in range(n_streams)
                ]
                tasks = [asyncio.ensure_future(call) for call in calls]
                deadline = time.monotonic() + 30
                while engine.running + engine.waiting < n_json + n_streams:
                    assert time.monotonic() < deadline, "the requests never reached the engine"
                    await asyncio.sleep(0.01)
                await asyncio.to_thread(engine.abort, EngineStopped(SHUTTING_DOWN))
                return await asyncio.gather(*tasks)

        answers = asyncio.run(scenario())
        assert engine.running == engine.waiting == 0
        for r in answers[:n_json]:
            assert r.status_code == 503 and r.headers["retry-after"] == "1"
            assert r.json() == {
                "detail": SHUTTING_DOWN,
                "errors": [{"loc": ["queue"], "msg": SHUTTING_DOWN}],
            }
        for r in answers[n_json:]:
            assert r.status_code == 200
            assert read_sse(r.text)[-1] == ("error", {"detail": SHUTTING_DOWN})
        assert failures(app).get("shutdown", 0) == before + n_json + n_streams
        # and it takes nothing new
        assert c.post("/forward", json={"text": "Привет"}).status_code == 503


def test_shutdown_grace_chains_the_servers_handler_then_aborts_when_the_grace_ends():
    """Runs in the main thread, as under uvicorn: the server's handler still gets the signal."""
    got: list[int] = []
    original = signal.signal(signal.SIGTERM, lambda sig, frame: got.append(sig))
    aborted: list[BaseException] = []
    host = SimpleNamespace(abort=aborted.append)  # ModelHost.abort: every engine of the host

    async def scenario():
        quiet = ShutdownGrace(host, 0.0)  # no signal: nothing is aborted, handlers come back
        quiet.install(asyncio.get_running_loop())
        await quiet.close()
        assert aborted == [] and signal.getsignal(signal.SIGTERM) is server_handler

        grace = ShutdownGrace(host, 0.05)
        grace.install(asyncio.get_running_loop())
        assert signal.getsignal(signal.SIGTERM) == grace._on_signal
        os.kill(os.getpid(), signal.SIGTERM)
        deadline = time.monotonic() + 10
        while not aborted:
            assert time.monotonic() < deadline, "the grace never ended"
            await asyncio.sleep(0.01)
        await grace.close()
        assert signal.getsignal(signal.SIGTERM) is server_handler

    try:
        server_handler = signal.getsignal(signal.SIGTERM)
        asyncio.run(scenario())
    finally:
        signal.signal(signal.SIGTERM, original)
    assert got == [signal.SIGTERM]
    assert len(aborted) == 1 and isinstance(aborted[0], EngineStopped)
    assert str(aborted[0]) == SHUTTING_DOWN


def test_micro_batcher_abort_ends_queued_and_running_requests():
    release = threading.Event()

    def predict(items):
        release.wait(30)
        return [i * 10 for i in items]

    batcher = MicroBatcher(predict, max_batch_size=1, max_wait_s=0)
    batcher.start()

    async def scenario():
        running = asyncio.ensure_future(batcher.submit(1))
        deadline = time.monotonic() + 10
        while batcher.running < 1:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        queued = [asyncio.ensure_future(batcher.submit(i)) for i in (2, 3)]
        while batcher.waiting < 2:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        await asyncio.to_thread(batcher.abort, EngineStopped(SHUTTING_DOWN))
        outcomes = await asyncio.gather(running, *queued, return_exceptions=True)
        assert all(isinstance(o, EngineStopped) for o in outcomes), outcomes
        with pytest.raises(EngineStopped):
            await batcher.submit(4)

    try:
        asyncio.run(scenario())
    finally:
        release.set()  # the abandoned predict returns; its outputs are dropped
        thread = batcher._thread
        batcher.stop(10)
    assert thread is not None and not thread.is_alive()


def test_host_abort_reaches_the_engines_of_old_versions_still_finishing(service, settings):
    """After a hot reload the old engine finishes its requests; when the grace ends it must be
    aborted too, not only the current one."""
    from ml_service.hosting import Loaded, ModelHost

    class Engine:
        def __init__(self):
            self.aborted: list[BaseException] = []

        def abort(self, error: BaseException) -> None:
            self.aborted.append(error)

    old, new = Engine(), Engine()
    host = ModelHost(settings, TextGenerationService(settings, inference=service))
    host._retiring_engines.add(old)
    host.current = Loaded(service=None, engine=new, version="v2")
    host.abort(EngineStopped(SHUTTING_DOWN))
    assert len(old.aborted) == len(new.aborted) == 1
