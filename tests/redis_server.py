"""A real `redis-server` for the fleet tests: started on a free port in a temporary directory (no
persistence), stopped afterwards; it can be killed and started again on the same port, which is
how the tests take Redis away from a running fleet. `make test` installs Debian's redis-server
when it is missing; elsewhere the tests that need it skip with the reason."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.helpers import wait_for


def redis_server_binary() -> str:
    binary = shutil.which("redis-server")
    if binary is None:
        reason = "no redis-server on PATH; run `make test` (it installs Debian's redis-server)"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)  # CI must run the fleet tests, never skip them
        pytest.skip(reason)
    return binary


class RedisServer:
    def __init__(self, port: int):
        self.port = port
        self.url = f"redis://127.0.0.1:{port}/0"
        self.dir = Path(tempfile.mkdtemp(prefix="redis-"))
        self.proc: subprocess.Popen | None = None

    def start(self) -> RedisServer:
        args = ["--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        self.proc = subprocess.Popen(
            [redis_server_binary(), *args, "--dir", str(self.dir)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for(self.answers, f"redis-server answers on port {self.port}", timeout=30)
        return self

    def answers(self) -> bool:
        import redis

        try:
            return bool(redis.Redis.from_url(self.url, socket_timeout=0.5).ping())
        except redis.RedisError:
            return False

    def client(self):
        import redis

        return redis.Redis.from_url(self.url, socket_timeout=2)

    def kill(self) -> None:
        """Gone at once (SIGKILL), as a crashed Redis would be."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        # the port is free again once nothing answers there
        deadline = time.monotonic() + 10
        while self.answers() and time.monotonic() < deadline:
            time.sleep(0.01)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        shutil.rmtree(self.dir, ignore_errors=True)
