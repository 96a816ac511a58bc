"""The real server in its own process, over real HTTP."""

from __future__ import annotations

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
    url, _ = server
    r = httpx.post(f"{url}/forward", json={"text": "Привет, мир!"}, timeout=60)
    assert r.status_code == 200
    assert is_russian(r.json()["text"]), r.json()


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
        t0 = time.perf_counter()
        status = httpx.get(f"{url}/health", timeout=10).status_code
        if not done.is_set():
            probes.append((status, time.perf_counter() - t0))
    worker.join(timeout=300)
    assert len(probes) >= 3, f"the batch finished after {len(probes)} probes: make it longer"
    assert all(status == 200 and seconds < 1.0 for status, seconds in probes), probes
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


# last: it stops the module's server
def test_sigterm_stops_the_server_cleanly(server):
    _, proc = server
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
