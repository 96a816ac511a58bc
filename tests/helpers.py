"""Plain helpers shared by more than one test module (pytest fixtures live in tests/conftest.py):
the checkpoint under test, polling with a deadline, settings and apps, a real server process and
its metrics, Server-Sent Events, the engine run on its own, and another model to compare with."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from safetensors.torch import load_file, save_file

from lib.inference import EngineObserver, GenerationParams, InferenceService
from lib.presets import DEFAULT_CHECKPOINT, REPO_ROOT
from ml_service.backend.app import create_app
from ml_service.services.text_generation import TextGenerationService

CHECKPOINT = Path(os.environ.get("TEST_CHECKPOINT", DEFAULT_CHECKPOINT))
DEVICE = os.environ.get("TEST_DEVICE", "cpu")  # e.g. cuda: bench/gpu_check.sh
# Nothing here asserts how fast anything is (bench/ measures that): the tests wait for events and
# check their order. This deadline only fails a test that hangs.
HANG_S = 60


# -- waiting for a condition ----------------------------------------------------------------------
def wait_for(condition, what: str, timeout: float = HANG_S) -> None:
    """Poll `condition` until it holds; the deadline only fails a test that hangs (nothing here
    asserts how fast anything is: bench/ measures that)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(0.01)


async def until(condition, what: str, timeout: float = HANG_S) -> None:
    """`wait_for` on a running event loop: poll `condition` between the loop's other work until it
    holds (a hang fails after `timeout` seconds)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, f"never happened: {what}"
        await asyncio.sleep(0.001)


def is_russian(text: str) -> bool:
    letters = [c for c in text if c.isalpha()]
    return (
        bool(letters)
        and sum("а" <= c.lower() <= "я" or c in "ёЁ" for c in letters) / len(letters) > 0.6
    )


# -- settings and apps ----------------------------------------------------------------------------
def with_settings(settings, **changes):
    """A validated copy (model_copy would skip validation)."""
    return type(settings)(**{**settings.model_dump(), **changes})


def app_with(service, settings, **changes):
    s = with_settings(settings, **changes)
    return create_app(s, service=TextGenerationService(s, inference=service))


def read_sse(text: str) -> list[tuple[str, dict]]:
    """(event name, data) pairs of a text/event-stream body."""
    events = []
    for block in text.split("\n\n"):
        if block.strip():
            fields = dict(line.split(": ", 1) for line in block.splitlines())
            events.append((fields["event"], json.loads(fields["data"])))
    return events


# -- a real server process ------------------------------------------------------------------------
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
    keep_log = False
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
        try:
            yield proc
        except BaseException:
            # the server's side of a failure, in the test's output: its log, and its last access
            # lines (one JSON line per request)
            lines = proc.log.read_text().splitlines()
            access = [line for line in lines if line.startswith('{"request_id"')]
            other = [line for line in lines if not line.startswith('{"request_id"')]
            print("---- server log ----", *other[-400:], "---- last access lines ----", sep="\n")
            print(*access[-40:], sep="\n")
            print(f"---- kept: {proc.log} ----")
            keep_log = True
            raise
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        log.close()
        if not keep_log:
            proc.log.unlink(missing_ok=True)


@contextmanager
def running_servers(count: int, args: list[str], runner: bool = False, env=None):
    """`count` real server processes with the same arguments (a fleet's replicas), as
    `running_server` makes them, started side by side and stopped side by side: each one's start
    is mostly an interpreter importing torch and loading the model, so two take about as long as
    one on two cores. Yields the processes in a tuple."""
    contexts = [running_server(args, runner=runner, env=env) for _ in range(count)]
    with ThreadPoolExecutor(count) as pool:
        starts = [pool.submit(c.__enter__) for c in contexts]
        wait(starts)
    started = [c for c, f in zip(contexts, starts, strict=True) if f.exception() is None]
    try:
        for f in starts:
            if f.exception() is not None:
                raise f.exception()
        yield tuple(f.result() for f in starts)
    except BaseException as e:
        for c in started:  # one by one, so each prints its own log whole
            c.__exit__(type(e), e, e.__traceback__)
        raise
    with ThreadPoolExecutor(count) as pool:
        for f in [pool.submit(c.__exit__, None, None, None) for c in started]:
            f.result()


def scrape(url: str) -> str:
    return httpx.get(f"{url}/metrics", timeout=HANG_S).text


def metric(text: str, name: str, **labels: str) -> float:
    """The sum of the samples of `name` (in Prometheus text `text`) that carry `labels`."""
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and labels.items() <= sample.labels.items()
    )


# -- the engine on its own ------------------------------------------------------------------------
class Recorder(EngineObserver):
    def __init__(self):
        self.finished = []
        self.batch_sizes = []

    def on_step(self, batch_size, seconds):
        self.batch_sizes.append(batch_size)

    def on_finished(self, request):
        self.finished.append(request)


async def with_engine(service: InferenceService, body, **kwargs):
    engine = service.create_engine(**kwargs)
    engine.start()
    try:
        return await body(engine)
    finally:
        engine.stop()


def check_a_cancelled_caller_frees_its_row(service) -> None:
    """A running request whose caller is cancelled leaves the batch (any `service`'s model:
    test_engine runs it over PyTorch, test_onnx over ONNX Runtime)."""
    params = GenerationParams(max_new_tokens=250, min_new_tokens=250, temperature=0.8, seed=3)
    rec = Recorder()

    async def body(engine):
        task = asyncio.ensure_future(engine.submit(service.prepare("Москва", params)))
        # running, and past its first decode step (the engine's second step: the first admitted it)
        await until(lambda: engine.running and len(rec.batch_sizes) >= 2, "the request decodes")
        task.cancel()  # what the HTTP layer does when the client disconnects
        await until(lambda: engine.running == 0, "the cancelled request left the batch")
        return engine.running

    assert asyncio.run(with_engine(service, body, observer=rec)) == 0
    (req,) = rec.finished
    assert req.result.finish_reason == "cancelled"
    assert 0 < req.result.completion_tokens < 250


# -- another model --------------------------------------------------------------------------------
def perturbed_copy(tmp_path, name: str):
    """A copy of the default checkpoint under directory `name`, every weight nudged by seeded
    noise (another model: greedy continuations differ)."""
    path = tmp_path / "other" / name
    shutil.copytree(CHECKPOINT, path)
    weights = path / "model.safetensors"
    tensors = load_file(weights)
    g = torch.Generator().manual_seed(0)
    for k, t in tensors.items():
        tensors[k] = t + 0.05 * torch.randn(t.shape, generator=g, dtype=t.dtype)
    save_file(tensors, weights, metadata={"format": "pt"})
    return path
