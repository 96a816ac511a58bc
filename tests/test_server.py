"""The real server in its own process, over real HTTP."""

from __future__ import annotations

import asyncio
import collections
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from lib.config import REPO_ROOT
from tests.conftest import CHECKPOINT, is_russian

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_server(args: list[str], runner: bool = False, env: dict[str, str] | None = None):
    """A real server process (serve.py, or `python -m ml_service.runner`); yields it, with its
    URL as `.url` and its output (log and JSON access lines) in the file `.log`."""
    port = free_port()
    env = {**os.environ, "ML_SERVICE_LOG_LEVEL": "warning", **(env or {})}
    cmd = [sys.executable, "-m", "ml_service.runner"] if runner else [sys.executable, "serve.py"]
    log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)  # a pipe could fill up
    proc = subprocess.Popen(
        [*cmd, *args, "--port", str(port)],
        env=env,
        cwd=REPO_ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
    )
    proc.log = Path(log.name)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                pytest.fail(f"server exited early:\n{proc.log.read_text()}")
            if time.monotonic() > deadline:
                pytest.fail("server did not start within 90 s")
            try:
                if httpx.get(f"{url}/ready", timeout=1).status_code == 200:
                    break
                time.sleep(0.1)
            except httpx.TransportError:
                time.sleep(0.2)
        proc.url = url
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        log.close()
        proc.log.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def server():
    with running_server(["--checkpoint", str(CHECKPOINT)]) as proc:
        yield proc.url, proc


def test_real_http_forward_returns_russian(server):
    """The README's request with the default sampling parameters. A seed makes it repeatable:
    unseeded, a rare sample of this small model drifts into Latin-script names, which the corpus
    has (none in 576 seeded samples here, 1 in 576 at top-p 0.9 / top-k 40; CI met one)."""
    url, _ = server
    for seed in (0, 1, 2):
        r = httpx.post(f"{url}/forward", json={"text": "Привет, мир!", "seed": seed}, timeout=60)
        assert r.status_code == 200
        assert is_russian(r.json()["text"]), r.json()
    unseeded = httpx.post(f"{url}/forward", json={"text": "Привет, мир!"}, timeout=60)
    assert unseeded.status_code == 200 and unseeded.json()["usage"]["completion_tokens"] >= 1


def test_health_answers_while_model_generates(server):
    """Generation runs off the event loop: liveness probes never wait for the model."""
    url, _ = server
    done = threading.Event()
    result = {}

    def long_batch():
        result["r"] = httpx.post(
            f"{url}/forward_batch",
            timeout=300,
            json={
                "texts": ["Москва"] * 64,
                "max_new_tokens": 250,
                "min_new_tokens": 250,
                "temperature": 0.9,
                "seed": 3,
            },
        )
        done.set()

    worker = threading.Thread(target=long_batch)
    worker.start()
    time.sleep(0.3)  # let the batch reach the model
    probes = []  # (status, seconds) of the probes answered while the batch was running
    while not done.is_set() and len(probes) < 10:
        for probe in ("/health", "/ready"):  # Kubernetes' liveness and readiness probes
            t0 = time.perf_counter()
            status = httpx.get(f"{url}{probe}", timeout=10).status_code
            if not done.is_set():
                probes.append((status, time.perf_counter() - t0))
    worker.join(timeout=300)
    assert len(probes) >= 3, f"the batch finished after {len(probes)} probes: make it longer"
    # answered in milliseconds although the model is busy (1 s leaves room for a loaded CI box)
    assert all(status == 200 and seconds < 1.0 for status, seconds in probes), probes
    assert sorted(s for _, s in probes)[len(probes) // 2] < 0.25, probes  # the median
    assert result["r"].status_code == 200 and len(result["r"].json()["results"]) == 64


def test_a_disconnected_client_stops_using_the_model():
    """With one batch row, a 64-text batch of 250 tokens each holds the model for many seconds;
    when its client disconnects, the rows are cancelled and the next request runs at once."""
    env = {"ML_SERVICE_MAX_BATCH_SIZE": "1"}
    with running_server(["--checkpoint", str(CHECKPOINT)], env=env) as proc:
        url = proc.url
        long_job = {
            "texts": ["Москва"] * 64,
            "max_new_tokens": 250,
            "min_new_tokens": 250,
            "temperature": 0.9,
        }
        t0 = time.perf_counter()
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/forward_batch", json=long_job, timeout=1.5)  # then hangs up
        short = httpx.post(
            f"{url}/forward", json={"text": "Привет", "max_new_tokens": 8}, timeout=60
        )
        waited = time.perf_counter() - t0
        assert short.status_code == 200
        # 16,000 tokens one row at a time would take well over 10 s on any CPU this runs on
        assert waited < 6, f"the next request waited {waited:.1f}s: the cancelled work went on"


def test_streaming_over_real_http(server):
    url, _ = server
    req = {"text": "Привет, мир!", "max_new_tokens": 24, "min_new_tokens": 24, "stream": True}
    names, pieces = [], []
    with httpx.stream("POST", f"{url}/forward", json=req, timeout=60) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("event: "):
                names.append(line.removeprefix("event: "))
            elif line.startswith("data: "):
                pieces.append(json.loads(line.removeprefix("data: ")))
    assert names[-1] == "done" and names.count("token") >= 5
    assert "".join(p["text"] for p in pieces[:-1]) == pieces[-1]["text"]
    assert pieces[-1]["usage"]["completion_tokens"] == 24


def test_sigterm_finishes_in_flight_requests_then_exits_0():
    """Graceful shutdown with a real process: on SIGTERM the server stops accepting, lets the
    request in flight finish (up to the grace period), then exits with status 0."""
    with running_server(["--checkpoint", str(CHECKPOINT)]) as proc:
        result = {}

        def long_request():
            result["r"] = httpx.post(
                f"{proc.url}/forward_batch",
                json={"texts": ["Москва"] * 16, "max_new_tokens": 250, "min_new_tokens": 250},
                timeout=120,
            )

        worker = threading.Thread(target=long_request)
        worker.start()
        time.sleep(0.5)  # the batch is being generated
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        with pytest.raises(httpx.TransportError):  # no new connections once stopping
            httpx.get(f"{proc.url}/health", timeout=2)
        worker.join(120)
        assert proc.wait(timeout=60) == 0
        r = result["r"]
        assert r.status_code == 200
        assert [x["usage"]["completion_tokens"] for x in r.json()["results"]] == [250] * 16


def test_sigterm_answers_what_cannot_finish_within_the_grace_with_503_or_an_error_event():
    """With a 2 s grace and one batch row, a queue of long generations (~0.35 s each on a 2-core
    CPU: several seconds in all) cannot finish before the grace ends. What is still queued or
    running then is answered, not cut off: JSON requests get 503 with `Retry-After` and the
    usual JSON error body, streams an `error` event; uvicorn cancels nothing; the exit is 0."""
    env = {"ML_SERVICE_SHUTDOWN_GRACE_S": "2", "ML_SERVICE_MAX_BATCH_SIZE": "1"}
    long_job = {"text": "Москва", "max_new_tokens": 250, "min_new_tokens": 250}
    n_json, n_streams = 20, 8

    def metric(text: str, name: str) -> float:
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith(name + " ") or line.startswith(name + "{")
        )

    async def scenario(proc) -> tuple[list[httpx.Response], list[list[tuple[str, dict]]]]:
        async with httpx.AsyncClient(base_url=proc.url, timeout=120) as client:

            async def stream() -> list[tuple[str, dict]]:
                events, name = [], None
                async with client.stream(
                    "POST", "/forward", json={**long_job, "stream": True}
                ) as r:
                    assert r.status_code == 200
                    async for line in r.aiter_lines():
                        if line.startswith("event: "):
                            name = line.removeprefix("event: ")
                        elif line.startswith("data: "):
                            events.append((name, json.loads(line.removeprefix("data: "))))
                return events

            jsons = [
                asyncio.create_task(client.post("/forward", json=long_job)) for _ in range(n_json)
            ]
            streams = [asyncio.create_task(stream()) for _ in range(n_streams)]
            # every generation is in the engine: admitted (queue time observed) or waiting
            deadline = time.monotonic() + 60
            while True:
                text = (await client.get("/metrics")).text
                queued = metric(text, "ml_service_num_requests_waiting")
                admitted = metric(text, "ml_service_request_queue_time_seconds_count")
                if queued + admitted >= n_json + n_streams:
                    break
                assert time.monotonic() < deadline, f"{queued} waiting, {admitted} admitted"
                await asyncio.sleep(0.02)
            assert queued >= 1, "the queue emptied before SIGTERM: make the requests longer"
            proc.send_signal(signal.SIGTERM)
            return list(await asyncio.gather(*jsons)), list(await asyncio.gather(*streams))

    with running_server(["--checkpoint", str(CHECKPOINT)], env=env) as proc:
        answers, streams = asyncio.run(scenario(proc))
        assert proc.wait(timeout=60) == 0
        log = proc.log.read_text()
    assert "timeout graceful shutdown exceeded" not in log, log  # uvicorn cancelled nothing
    statuses = collections.Counter(r.status_code for r in answers)
    assert set(statuses) <= {200, 503}, statuses
    assert statuses[503] >= 1, statuses
    for r in answers:
        if r.status_code == 503:
            assert r.headers["content-type"] == "application/json"
            assert r.headers["retry-after"] == "1"
            assert r.json() == {
                "detail": "the service is shutting down",
                "errors": [{"loc": ["queue"], "msg": "the service is shutting down"}],
            }
        else:
            assert r.json()["usage"]["completion_tokens"] == 250
    for events in streams:
        name, data = events[-1]
        assert name in ("done", "error"), events[-1]
        if name == "error":
            assert data == {"detail": "the service is shutting down"}
        else:
            assert data["usage"]["completion_tokens"] == 250


BURST_PROMPTS = [
    "Привет, мир!",
    "Москва",
    "Он открыл дверь и",
    "В начале было",
    "Когда я был маленьким",
    "Она сказала, что",
    "Вчера вечером мы",
    "Русский язык",
]


def test_a_burst_of_1000_requests_over_64_clients_against_a_queue_of_32(service):
    """Every request is either answered with exactly its own text or refused with 503/429:
    none lost, none crossed, no 5xx but 503."""
    from lib.inference import GenerationParams

    params = GenerationParams(max_new_tokens=8, temperature=0)
    # prompt i ends with its number, so every answer belongs to one request only
    prompts = [f"{BURST_PROMPTS[i % len(BURST_PROMPTS)]} {i}" for i in range(1000)]
    expected = [r.text for r in service.generate_batch(prompts, params)]
    env = {"ML_SERVICE_MAX_BATCH_SIZE": "8", "ML_SERVICE_MAX_QUEUE": "32"}
    outcomes: dict[int, tuple[int, str | None]] = {}

    async def burst(url: str) -> None:
        todo = iter(range(1000))
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
        async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:

            async def worker():
                for i in todo:
                    r = await client.post(
                        "/forward",
                        json={"text": prompts[i], "max_new_tokens": 8, "temperature": 0},
                        headers={"X-Request-ID": f"burst-{i}"},
                    )
                    assert r.headers["x-request-id"] == f"burst-{i}"
                    outcomes[i] = (r.status_code, r.json().get("text"))

            await asyncio.gather(*(worker() for _ in range(64)))

    with running_server(["--checkpoint", str(CHECKPOINT)], env=env) as proc:
        asyncio.run(burst(proc.url))
        metrics = httpx.get(f"{proc.url}/metrics").text
    assert sorted(outcomes) == list(range(1000))  # none lost
    statuses = collections.Counter(code for code, _ in outcomes.values())
    assert set(statuses) <= {200, 503, 429}, statuses
    # the first wave alone fills the 8 rows and the 32 queue places: at least 40 answers; and
    # with 64 clients some requests found the queue full
    assert statuses[200] >= 40 and statuses[503] >= 1, statuses
    crossed = [i for i, (code, text) in outcomes.items() if code == 200 and text != expected[i]]
    assert not crossed, [(i, outcomes[i][1], expected[i]) for i in crossed[:5]]
    assert 'ml_service_request_failures_total{reason="queue_full"}' in metrics


# last: it stops the module's server
def test_sigterm_stops_the_server_cleanly(server):
    _, proc = server
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
