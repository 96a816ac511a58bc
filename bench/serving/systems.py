"""The systems under test: how each server is started (command, environment), what it is sent
(request body) and how its answers are read, plus the server process that runs one of them."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
TEMPERATURE = 0.8
SYSTEM_NAMES = ("ours", "ours-nobatch", "tf-serve", "tf-serve-cb")


@dataclass
class RequestResult:
    ok: bool
    latency: float
    completion_tokens: int = 0
    ttft: float | None = None
    error: str = ""
    prompt_tokens: int = 0


def _checked(latency: float, usage: dict, expected: int, ttft: float | None = None):
    tokens = int(usage["completion_tokens"])
    prompt_tokens = int(usage.get("prompt_tokens", 0))
    if tokens != expected:
        return RequestResult(
            False, latency, tokens, ttft, f"short: {tokens} of {expected} tokens", prompt_tokens
        )
    return RequestResult(True, latency, tokens, ttft, prompt_tokens=prompt_tokens)


class System:
    name: str
    description: str
    ready_path = "/health"  # answers 200 once the server can generate
    path: str  # the generation endpoint

    def command(self, checkpoint: Path, port: int) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict[str, str]:
        return {}

    def display_command(self, checkpoint: str, port: str = "PORT") -> str:
        env = " ".join(f"{k}={v}" for k, v in self.env().items())
        cmd = shlex.join(self.command(Path(checkpoint), 0)).replace(" --port 0", f" --port {port}")
        cmd = cmd.replace(shlex.quote(sys.executable), "python")
        return f"{env} {cmd}".strip()

    def payload(self, prompt: str, seed: int, max_new: int, stream: bool) -> dict:
        raise NotImplementedError

    def read_event(self, line: str, state: dict) -> dict | None:
        """One line of the event stream: returns the `usage` when the answer is complete, raises
        RuntimeError for an error event; `state` carries what earlier lines set."""
        raise NotImplementedError

    async def request(
        self, client: httpx.AsyncClient, prompt: str, seed: int, max_new: int, stream: bool
    ) -> RequestResult:
        body = self.payload(prompt, seed, max_new, stream)
        t0 = time.perf_counter()
        if stream:
            return await self._streamed(client, body, max_new, t0)
        r = await client.post(self.path, json=body)
        latency = time.perf_counter() - t0
        if r.status_code != 200:
            return RequestResult(False, latency, error=f"HTTP {r.status_code}: {r.text[:200]}")
        return _checked(latency, r.json()["usage"], max_new)

    async def _streamed(
        self, client: httpx.AsyncClient, body: dict, max_new: int, t0: float
    ) -> RequestResult:
        state: dict = {}
        async with client.stream("POST", self.path, json=body) as r:
            if r.status_code != 200:
                text = (await r.aread()).decode(errors="replace")
                return RequestResult(
                    False, time.perf_counter() - t0, error=f"HTTP {r.status_code}: {text[:200]}"
                )
            async for line in r.aiter_lines():
                try:
                    usage = self.read_event(line, state)
                except RuntimeError as e:
                    return RequestResult(False, time.perf_counter() - t0, error=str(e))
                if state.get("text") and "ttft" not in state:
                    state["ttft"] = time.perf_counter() - t0
                if usage is not None:
                    return _checked(time.perf_counter() - t0, usage, max_new, state.get("ttft"))
                if state.get("ended"):
                    break
        return RequestResult(False, time.perf_counter() - t0, error="stream ended without usage")


class Ours(System):
    ready_path = "/ready"  # /health answers while the model still loads
    path = "/forward"

    def __init__(self, name: str, max_batch_size: int, device: str = "cpu", dtype: str = "float32"):
        self.name = name
        self.max_batch_size = max_batch_size
        self.device, self.dtype = device, dtype
        self.description = (
            "our service, continuous batching (up to 64 rows)"
            if max_batch_size > 1
            else "our service, batching disabled (batch size 1)"
        )

    def command(self, checkpoint: Path, port: int) -> list[str]:
        return [sys.executable, "serve.py", "--checkpoint", str(checkpoint), "--port", str(port)]

    def env(self) -> dict[str, str]:
        env = {
            "ML_SERVICE_MAX_BATCH_SIZE": str(self.max_batch_size),
            "ML_SERVICE_LOG_LEVEL": "warning",
        }
        if (self.device, self.dtype) != ("cpu", "float32"):
            env.update(ML_SERVICE_DEVICE=self.device, ML_SERVICE_DTYPE=self.dtype)
        return env

    def payload(self, prompt: str, seed: int, max_new: int, stream: bool) -> dict:
        body = {
            "text": prompt,
            "max_new_tokens": max_new,
            "min_new_tokens": max_new,
            "temperature": TEMPERATURE,
            "seed": seed,
        }
        if stream:
            body["stream"] = True
        return body

    def read_event(self, line: str, state: dict) -> dict | None:
        if line.startswith("event:"):
            state["event"] = line[6:].strip()
        elif line.startswith("data:"):
            data = json.loads(line[5:])
            if state.get("event") == "token" and data.get("text"):
                state["text"] = True
            elif state.get("event") == "done":
                return data["usage"]
            elif state.get("event") == "error":
                raise RuntimeError(f"error event: {data}")
        return None


class TransformersServe(System):
    path = "/v1/completions"

    def __init__(
        self,
        name: str,
        continuous_batching: bool,
        checkpoint: Path,
        device: str = "cpu",
        dtype: str = "float32",
    ):
        self.name = name
        self.cb = continuous_batching
        self.device, self.dtype = device, dtype
        self.description = (
            "`transformers serve --continuous-batching` (paged attention)"
            if continuous_batching
            else "`transformers serve` (one `generate()` at a time)"
        )
        self.generation_config = self._generation_config(checkpoint)

    def command(self, checkpoint: Path, port: int) -> list[str]:
        exe = Path(sys.executable).with_name("transformers")
        cmd = [str(exe) if exe.exists() else "transformers", "serve", str(checkpoint)]
        if self.cb:
            cmd.append("--continuous-batching")
        cmd += ["--device", self.device, "--dtype", self.dtype]
        cmd += ["--host", "127.0.0.1", "--port", str(port)]
        return cmd

    def display_command(self, checkpoint: str, port: str = "PORT") -> str:
        cmd = super().display_command(checkpoint, port)
        return cmd.replace(str(Path(sys.executable).with_name("transformers")), "transformers")

    def env(self) -> dict[str, str]:
        return {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}

    def _generation_config(self, checkpoint: Path) -> dict:
        """The checkpoint's generation config (same sampling as ours: temperature 0.8, top-p 0.95,
        top-k 50, repetition penalty 1.1), made to generate exactly max_new_tokens."""
        path = checkpoint / "generation_config.json"
        config = json.loads(path.read_text()) if path.exists() else {}
        config.pop("transformers_version", None)
        config.update(do_sample=True, temperature=TEMPERATURE)
        if self.cb:
            # continuous batching drops the processors it does not support (min_new_tokens and
            # repetition_penalty among them) and stops at eos_token_id per request: -1 turns EOS off
            config.pop("repetition_penalty", None)
            config["eos_token_id"] = -1
        return config

    def payload(self, prompt: str, seed: int, max_new: int, stream: bool) -> dict:
        config = dict(self.generation_config, max_new_tokens=max_new)
        if not self.cb:
            config["min_new_tokens"] = max_new  # EOS masked until max_new, as ours does
        body = {
            "prompt": prompt,
            "max_tokens": max_new,
            "seed": seed,
            "generation_config": json.dumps(config),
        }
        if stream:
            body["stream"] = True
        return body

    def read_event(self, line: str, state: dict) -> dict | None:
        if not line.startswith("data:"):
            return None
        payload = line[5:].strip()
        if payload == "[DONE]":
            state["ended"] = True
            return None
        data = json.loads(payload)
        if "error" in data:
            raise RuntimeError(f"error chunk: {data['error']}")
        choices = data.get("choices") or [{}]
        if choices[0].get("text"):
            state["text"] = True
        return data.get("usage") or None


def make_systems(
    names: list[str], checkpoint: Path, device: str = "cpu", dtype: str = "float32"
) -> list[System]:
    factories = {
        "ours": lambda: Ours("ours", 64, device, dtype),
        "ours-nobatch": lambda: Ours("ours-nobatch", 1, device, dtype),
        "tf-serve": lambda: TransformersServe("tf-serve", False, checkpoint, device, dtype),
        "tf-serve-cb": lambda: TransformersServe("tf-serve-cb", True, checkpoint, device, dtype),
    }
    return [factories[n]() for n in names]


# --------------------------------------------------------------------------------------------
# server processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_env(system: System, threads: int | None) -> dict[str, str]:
    """This process's environment with the system's own, and `threads` math threads if given."""
    env = dict(os.environ, **system.env())
    if threads:  # the same number of math threads for every server
        env.update(
            OMP_NUM_THREADS=str(threads),
            MKL_NUM_THREADS=str(threads),
            ML_SERVICE_TORCH_THREADS=str(threads),
        )
    env.pop("ML_SERVICE_PORT", None)
    return env


class Server:
    """One system's server process, started and stopped by us."""

    live: set[Server] = set()  # stopped by main() whatever happens

    def __init__(self, system: System, checkpoint: Path, threads: int, log_dir: Path):
        self.system = system
        self.port = free_port()
        self.log_path = log_dir / f"{system.name}.log"
        env = server_env(system, threads)
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            system.command(checkpoint.resolve(), self.port),
            cwd=ROOT,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.url = f"http://127.0.0.1:{self.port}"
        Server.live.add(self)

    async def wait_healthy(self, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        async with httpx.AsyncClient(base_url=self.url, timeout=5) as client:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{self.system.name} exited: {self.log_tail()}")
                with contextlib.suppress(httpx.HTTPError):
                    if (await client.get(self.system.ready_path)).status_code == 200:
                        return
                await asyncio.sleep(0.25)
        raise RuntimeError(
            f"{self.system.name} not healthy after {timeout:.0f}s: {self.log_tail()}"
        )

    def log_tail(self, n: int = 2000) -> str:
        self._log.flush()
        return self.log_path.read_bytes()[-n:].decode(errors="replace")

    def stop(self) -> None:
        Server.live.discard(self)
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()
