"""The engine in its own process (`lib/inference/engine_process/`, ML_SERVICE_ENGINE=process):
the same answers as the engine in a thread, backpressure decided in the front, cancellation,
stop and abort, and an engine process that dies (killed with SIGKILL): its requests end with a
clear error, never a hang, /ready and /metrics say so, and a new process takes over."""

from __future__ import annotations

import asyncio
import os
import signal
import threading

import pytest
from fastapi.testclient import TestClient

from lib.inference import (
    EngineDied,
    EngineObserver,
    EngineSpec,
    EngineStopped,
    GenerationParams,
    GenerationResult,
    LoadSpec,
    QueueFull,
)
from lib.inference.engine_process.client import EngineProcess
from lib.inference.engine_process.launch import Standby
from lib.inference.frontend import FrontendInference
from ml_service.backend.app import create_app
from tests.helpers import CHECKPOINT, metric, wait_for, with_settings

LONG = GenerationParams(max_new_tokens=200, min_new_tokens=200, temperature=0)


@pytest.fixture(scope="module")
def process_settings(settings):
    return settings.model_copy(update={"engine": "process"})


@pytest.fixture(scope="module")
def process_client(process_settings):
    with TestClient(create_app(process_settings), raise_server_exceptions=False) as c:
        yield c


def test_the_front_holds_no_weights_and_the_engine_runs_elsewhere(process_client):
    host = process_client.app.state.deps.host
    loaded = host.current
    assert isinstance(loaded.service.inference, FrontendInference)
    assert isinstance(loaded.engine, EngineProcess)
    assert loaded.engine.pid != os.getpid() and loaded.engine.alive
    weight = next(loaded.service.inference.model.parameters())
    assert weight.device.type == "meta"  # no memory in the front
    meta = process_client.get("/metadata").json()
    assert meta["device"] == "cpu" and meta["dtype"] == "float32"
    assert (
        meta["parameters"]
        == process_client.app.state.deps.host.current.service.metadata()["parameters"]
    )


BODIES = [
    {"text": "Привет, мир!", "temperature": 0, "max_new_tokens": 24},
    {"text": "Москва", "temperature": 0.9, "seed": 7, "max_new_tokens": 24},
    {"text": "Он сказал", "temperature": 0.8, "seed": 3, "stop": ["."], "max_new_tokens": 40},
]


@pytest.mark.parametrize("body", BODIES, ids=["greedy", "seeded", "stop"])
def test_answers_equal_the_engine_in_a_thread(process_client, client, body):
    here, there = client.post("/forward", json=body), process_client.post("/forward", json=body)
    assert here.status_code == there.status_code == 200
    assert there.json() == here.json()
    streamed = process_client.post("/forward", json={**body, "stream": True})
    assert streamed.status_code == 200
    assert "event: error" not in streamed.text


def test_openai_echo_logprobs_are_scored_by_the_engine_process(process_client, client):
    body = {"prompt": "Привет, мир", "max_tokens": 4, "temperature": 0, "echo": True, "logprobs": 2}
    here = client.post("/v1/completions", json=body).json()
    there = process_client.post("/v1/completions", json=body).json()
    assert there["choices"][0]["text"] == here["choices"][0]["text"]
    mine, theirs = there["choices"][0]["logprobs"], here["choices"][0]["logprobs"]
    assert mine["tokens"] == theirs["tokens"]
    assert mine["token_logprobs"][0] is None  # the first prompt token has no context
    assert mine["token_logprobs"][1:] == pytest.approx(theirs["token_logprobs"][1:], abs=1e-5)


def test_batches_and_streams_over_the_pipe(process_client, client):
    body = {"texts": ["Привет", "Москва", "Сегодня"], "temperature": 0, "max_new_tokens": 12}
    assert (
        process_client.post("/forward_batch", json=body).json()["results"]
        == (client.post("/forward_batch", json=body).json()["results"])
    )
    chat = {
        "messages": [{"role": "user", "content": "Привет"}],
        "max_tokens": 8,
        "temperature": 0,
        "stream": True,
    }
    streamed = process_client.post("/v1/chat/completions", json=chat)
    assert streamed.status_code == 200 and streamed.text.rstrip().endswith("data: [DONE]")


# -- EngineProcess on its own ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def front():
    return FrontendInference.load(
        EngineSpec(load=LoadSpec(checkpoint=str(CHECKPOINT)), max_batch_size=1)
    )


class TokenCounter(EngineObserver):
    """How many tokens the engine process generated (its per-step metric events)."""

    def __init__(self):
        self.tokens = 0

    def on_tokens(self, count: int, gaps: list[float]) -> None:
        self.tokens += count


@pytest.fixture(scope="module")
def shared_engine(front):
    """One engine process (1 batch row, 1 queue place), started once for this module's tests
    that only submit to it and wait until what they sent has ended (the full queue, the closed
    stream). Safe to share: none stops, aborts or kills it, and `engine` below checks that a test
    left nothing in it and counts each test's tokens from zero. The tests that stop, abort or
    kill an engine start their own."""
    engine = EngineProcess(front.spec, max_queue=1, observer=TokenCounter(), standby=None)
    engine.start()
    yield engine
    engine.stop(5)


@pytest.fixture
def engine(shared_engine, front):
    """The module's engine process for one test: `front` sends to it, its token count starts at
    zero, and after the test none of the test's requests is still held by it."""
    front.engine = shared_engine
    shared_engine.observer.tokens = 0
    yield shared_engine
    wait_for(lambda: not shared_engine._pending, "the test's requests ended in the engine")


def test_a_full_queue_is_refused_in_the_front_and_a_cancelled_waiter_frees_its_place(engine, front):
    async def body():
        first = asyncio.ensure_future(engine.submit(front.prepare("Москва", LONG)))
        await asyncio.to_thread(wait_for, lambda: engine.running == 1, "the first one runs")
        second = asyncio.ensure_future(engine.submit(front.prepare("Он", LONG)))
        await asyncio.sleep(0)  # queued
        assert engine.waiting == 1 and not engine.has_room()
        with pytest.raises(QueueFull):
            await engine.submit(front.prepare("Она", LONG))
        second.cancel()  # its client went away while it waited
        await asyncio.to_thread(wait_for, engine.has_room, "the cancelled one gave its place up")
        third = await engine.submit(front.prepare("Она", LONG))
        return await first, third

    first, third = asyncio.run(body())
    assert first.completion_tokens == third.completion_tokens == 200
    # the cancelled waiter never ran: the engine generated the first's and the third's tokens only
    assert engine.observer.tokens == 400


def test_a_closed_stream_cancels_its_row(engine, front):
    async def body():
        stream = engine.stream(front.prepare("Москва", LONG))
        pieces = []
        async for piece in stream:
            pieces.append(piece)
            if len(pieces) == 3:
                break
        await stream._iterate().aclose()
        return pieces

    pieces = asyncio.run(body())
    assert len(pieces) == 3 and all(isinstance(p, str) for p in pieces)
    wait_for(lambda: engine.running == 0 and not engine._pending, "the row left the batch")
    assert engine.observer.tokens < LONG.max_new_tokens  # it left early, cancelled


@pytest.mark.slow  # its own engine process, started, then ended or replaced
def test_stop_finishes_what_runs_then_refuses(front):
    engine = EngineProcess(front.spec, max_queue=4, standby=None)
    engine.start()
    front.engine = engine
    params = GenerationParams(max_new_tokens=30, min_new_tokens=30, temperature=0)

    async def body():
        task = asyncio.ensure_future(engine.submit(front.prepare("Москва", params)))
        await asyncio.to_thread(wait_for, lambda: engine.running == 1, "it runs")
        await asyncio.to_thread(engine.stop, 30)
        return await task

    result = asyncio.run(body())
    assert isinstance(result, GenerationResult) and result.completion_tokens == 30
    assert engine.stopped

    async def late():
        return await engine.submit(front.prepare("Москва", params))

    with pytest.raises(EngineStopped):
        asyncio.run(late())


@pytest.mark.slow  # its own engine process, started, then ended or replaced
def test_abort_ends_every_request_at_once(front):
    engine = EngineProcess(front.spec, max_queue=4, standby=None)
    engine.start()

    async def body():
        tasks = [
            asyncio.ensure_future(engine.submit(front.prepare(t, LONG))) for t in ("Москва", "Он")
        ]
        await asyncio.to_thread(wait_for, lambda: engine.running == 1, "one runs")
        await asyncio.to_thread(engine.abort, EngineStopped("shutting down"))
        return await asyncio.gather(*tasks, return_exceptions=True)

    try:
        outcomes = asyncio.run(body())
    finally:
        engine.stop(5)
    assert all(isinstance(o, EngineStopped) for o in outcomes), outcomes


def started_with_a_standby(front) -> tuple[EngineProcess, Standby]:
    """An engine process started with a standby of its own (not the server's)."""
    standby = Standby()
    engine = EngineProcess(front.spec, max_queue=4, standby=standby)
    engine.start()
    return engine, standby


@pytest.mark.slow  # its own engine process, started, then ended or replaced
def test_a_killed_engine_process_fails_its_requests_and_is_replaced(front):
    engine, standby = started_with_a_standby(front)
    first_pid, standby_pid = engine.pid, standby.pid
    assert standby_pid not in (None, first_pid)  # launched as the engine came up
    try:

        async def body():
            task = asyncio.ensure_future(engine.submit(front.prepare("Москва", LONG)))
            await asyncio.to_thread(wait_for, lambda: engine.running == 1, "it runs")
            os.kill(first_pid, signal.SIGKILL)
            with pytest.raises(EngineDied, match="retry"):
                await task

        asyncio.run(body())
        wait_for(lambda: engine.alive, "a new engine process took over", timeout=120)
        # the standby took over, and the next one is launched right after (the restart marks
        # the engine up first, then counts it and refills: wait for those, not only for "up")
        wait_for(lambda: engine.restarts == 1, "the restart counted")
        wait_for(lambda: standby.pid not in (None, first_pid, standby_pid), "a new standby")
        assert engine.pid == standby_pid
        assert set(engine.phases) >= {"noticed", "launched", "imported", "loaded", "ready"}

        async def again():
            return await engine.submit(front.prepare("Москва", GenerationParams(temperature=0)))

        assert asyncio.run(again()).completion_tokens > 0
    finally:
        engine.stop(5)
    assert standby.pid is None  # its last engine stopped: the standby ended with it
    wait_for(lambda: not alive(standby_pid) and not alive(first_pid), "no process left behind")


@pytest.mark.slow  # its own engine process, started, then ended or replaced
def test_a_standby_that_died_is_replaced_by_a_new_worker_and_stop_ends_them_all(front):
    engine, standby = started_with_a_standby(front)
    first_pid, dead_standby = engine.pid, standby.pid
    try:
        os.kill(dead_standby, signal.SIGKILL)
        wait_for(lambda: not alive(dead_standby), "the standby is gone")
        os.kill(first_pid, signal.SIGKILL)
        wait_for(lambda: engine.restarts == 1 and engine.alive, "a new worker took over")
        assert engine.pid not in (first_pid, dead_standby)
        # and a standby again (launched once the new worker is up: not necessarily yet)
        wait_for(lambda: standby.pid not in (None, engine.pid), "a new standby")

        async def again():
            return await engine.submit(front.prepare("Москва", GenerationParams(temperature=0)))

        assert asyncio.run(again()).completion_tokens > 0
        pids = [engine.pid, standby.pid]
    finally:
        engine.stop(5)
    assert standby.pid is None
    wait_for(lambda: not any(alive(pid) for pid in pids), "no process left behind")


def alive(pid: int) -> bool:
    """Whether process `pid` runs (a zombie, dead but not reaped yet, does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow  # its own engine process, started, then ended or replaced
def test_over_http_a_dead_engine_is_a_503_then_ready_again(process_settings):
    settings = process_settings.model_copy(update={"max_batch_size": 1})
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        engine = c.app.state.deps.host.current.engine
        answers = {}

        def send():
            answers["long"] = c.post(
                "/forward", json={"text": "Москва", "max_new_tokens": 250, "temperature": 0}
            )

        sender = threading.Thread(target=send)
        sender.start()
        wait_for(lambda: engine.running == 1, "the long request runs")
        os.kill(engine.pid, signal.SIGKILL)
        sender.join(60)
        long = answers["long"]
        assert long.status_code == 503 and long.headers["Retry-After"] == "5"
        assert long.json()["errors"][0]["loc"] == ["engine"]
        assert "retry" in long.json()["detail"]

        def restarting() -> bool:
            r = c.get("/ready")
            return r.status_code == 503 and r.json()["status"] == "restarting"

        if not engine.alive:  # a new process takes seconds to import torch: seen almost always
            wait_for(lambda: restarting() or engine.alive, "/ready says restarting")
        wait_for(lambda: c.get("/ready").status_code == 200, "ready again", timeout=120)
        text = c.get("/metrics").text
        assert metric(text, "ml_service_engine_up") == 1
        assert metric(text, "ml_service_engine_restarts_total", version="default") == 1
        ok = c.post("/forward", json={"text": "Москва", "max_new_tokens": 5, "temperature": 0})
        assert ok.status_code == 200


@pytest.mark.slow  # its own engine process, started, then ended or replaced
def test_a_reload_starts_a_new_engine_process_and_ends_the_old_one(process_settings, models_dir):
    settings = with_settings(
        process_settings, models_dir=models_dir, model_version="v2", admin_token="adm"
    )
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        old = c.app.state.deps.host.current.engine
        r = c.post("/admin/reload", json={"version": "v1"}, headers={"Authorization": "Bearer adm"})
        assert r.status_code == 200 and r.json()["previous_version"] == "v2"
        new = c.app.state.deps.host.current.engine
        assert new is not old and new.pid != old.pid and new.alive
        wait_for(lambda: old.stopped, "the old engine process ended")
        body = {"text": "Москва", "max_new_tokens": 5, "temperature": 0}
        assert c.post("/forward", json=body).json()["model"] == "ru-gpt-tiny-v1"
        broken = c.post(
            "/admin/reload", json={"version": "v3"}, headers={"Authorization": "Bearer adm"}
        )
        assert broken.status_code == 400 and c.app.state.deps.host.current.engine is new


def test_the_standby_setting_reaches_the_engine(settings):
    """ML_SERVICE_ENGINE_STANDBY=false: a crashed engine is replaced by a new process (no spare
    held); the default keeps the server's spare (nothing starts before `start`)."""
    on = EngineProcess.create(with_settings(settings, engine="process").engine_spec())
    off_settings = with_settings(settings, engine="process", engine_standby=False)
    off = EngineProcess.create(off_settings.engine_spec())
    assert isinstance(on.standby, Standby) and off.standby is None
