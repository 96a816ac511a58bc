"""The real server in its own process, over real HTTP."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

from lib.config import REPO_ROOT
from tests.conftest import CHECKPOINT, is_russian

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    port = free_port()
    env = {
        **os.environ,
        "ML_SERVICE_CHECKPOINT": str(CHECKPOINT),
        "ML_SERVICE_LOG_LEVEL": "warning",
    }
    proc = subprocess.Popen(
        [sys.executable, str(REPO_ROOT / "serve.py"), "--port", str(port)],
        env=env,
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"server exited early:\n{proc.stdout.read()}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail("server did not start within 60 s")
    yield url, proc
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


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
            json={"texts": ["Москва"] * 16, "max_new_tokens": 200, "temperature": 0.9, "seed": 3},
        )
        done.set()

    worker = threading.Thread(target=long_batch)
    worker.start()
    time.sleep(1.0)  # let the batch reach the model
    probes = [httpx.get(f"{url}/health", timeout=10) for _ in range(5)]
    busy_during_probes = not done.is_set()
    worker.join(timeout=300)
    assert all(p.status_code == 200 for p in probes)
    assert busy_during_probes, "the batch finished before the probes: make it longer"
    assert result["r"].status_code == 200 and len(result["r"].json()["results"]) == 16


def test_sigterm_stops_the_server_cleanly(server):
    _, proc = server
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
