#!/usr/bin/env python
"""Serving throughput and latency: our service against `transformers serve`, in the manner of
`vllm bench serve`.

Each system is started as a subprocess on a free local port (one at a time, each with the whole
machine), warmed up, then loaded by one asyncio + httpx client process:

- closed loop: N concurrent clients (`--concurrency 1 4 16 64`), each sending its next request as
  soon as the previous one is answered, `--requests-per-client` requests per client (at least
  `--min-requests` in all);
- open loop (`--rate R ...`): `--num-requests` requests with Poisson arrivals at R requests/s,
  however many are in flight.

Every request continues one of a fixed set of Russian prompts from the validation split of the
bundled corpus and asks for exactly `--max-new-tokens` tokens. Every response is checked (status
200, the completion token count); a failed or short response counts as an error. Reported: output
tokens/s, requests/s, end-to-end latency p50/p95/p99 and, with `--stream`, time to first token and
time per output token (after the first).

The machine is shared: before each server and each row the script waits (up to `--wait-quiet`
seconds) for other processes to leave the CPU idle, measures from /proc how the CPU was split
during the row (server / client / anything else), and runs a row again when anything else took
more than `--max-other-cpu` of it.

Systems: `ours` (serve.py, continuous batching up to 64 rows), `ours-nobatch` (the same with
ML_SERVICE_MAX_BATCH_SIZE=1), `tf-serve` (`transformers serve CHECKPOINT`, one `generate()` at a
time) and `tf-serve-cb` (the same with `--continuous-batching`). The peer needs
`pip install "transformers[serving]"` (the `bench` extra).

    python bench/serve_bench.py --stream --write BENCHMARKS.md --plot bench/serve_bench.png
    python bench/serve_bench.py --systems ours tf-serve-cb --concurrency 4 --requests-per-client 2
    python bench/serve_bench.py --rate 2 8 --num-requests 64 --stream

On a GPU, with a randomly initialised GPT-2 small (bench/random_checkpoint.py writes it):

    python bench/random_checkpoint.py --preset gpt2-124m
    python bench/serve_bench.py --checkpoint runs/bench/random-gpt2-124m --device cuda \
        --dtype bfloat16 --stream
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import platform
import random
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SECTION_START = "<!-- serve_bench:start -->"
SECTION_END = "<!-- serve_bench:end -->"
TEMPERATURE = 0.8

# --------------------------------------------------------------------------------------------
# prompts


def validation_prompts(count: int, max_chars: int, val_fraction: float) -> list[str]:
    """The first `count` documents of the validation split, cut at a word boundary."""
    from lib.data import load_documents, split_documents

    _, val = split_documents(load_documents("bundled"), val_fraction)
    prompts = []
    for doc in val[:count]:
        text = doc if len(doc) <= max_chars else doc[: max_chars + 1].rsplit(" ", 1)[0]
        prompts.append(text.strip())
    return prompts


# --------------------------------------------------------------------------------------------
# systems: how each is started and spoken to


@dataclass
class RequestResult:
    ok: bool
    latency: float
    completion_tokens: int = 0
    ttft: float | None = None
    error: str = ""
    prompt_tokens: int = 0


class System:
    name: str
    description: str
    ready_path = "/health"  # answers 200 once the server can generate

    def command(self, checkpoint: Path, port: int) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict[str, str]:
        return {}

    def display_command(self, checkpoint: str, port: str = "PORT") -> str:
        env = " ".join(f"{k}={v}" for k, v in self.env().items())
        cmd = shlex.join(self.command(Path(checkpoint), 0)).replace(" --port 0", f" --port {port}")
        cmd = cmd.replace(shlex.quote(sys.executable), "python")
        return f"{env} {cmd}".strip()

    path: str  # the generation endpoint

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
        if not stream:
            r = await client.post(self.path, json=body)
            latency = time.perf_counter() - t0
            if r.status_code != 200:
                return RequestResult(False, latency, error=f"HTTP {r.status_code}: {r.text[:200]}")
            return _checked(latency, r.json()["usage"], max_new)
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


def _checked(latency: float, usage: dict, expected: int, ttft: float | None = None):
    tokens = int(usage["completion_tokens"])
    prompt_tokens = int(usage.get("prompt_tokens", 0))
    if tokens != expected:
        return RequestResult(
            False, latency, tokens, ttft, f"short: {tokens} of {expected} tokens", prompt_tokens
        )
    return RequestResult(True, latency, tokens, ttft, prompt_tokens=prompt_tokens)


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


SYSTEM_NAMES = ("ours", "ours-nobatch", "tf-serve", "tf-serve-cb")

# --------------------------------------------------------------------------------------------
# server processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def machine_cpu_seconds() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, from /proc/stat (0s elsewhere)."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return 0.0, 0.0
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields) - idle) / TICK, sum(fields) / TICK


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of one process (all its threads), from /proc/PID/stat."""
    try:
        after_name = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(after_name[11]) + int(after_name[12])) / TICK
    except (OSError, ValueError, IndexError):
        return 0.0


class CpuMeter:
    """How the machine's CPU was shared during a row: our server, this client, and the rest
    (other people's work, which makes the row noisy), as fractions of all cores' time."""

    def __init__(self, server_pid: int):
        self.pid = server_pid
        self.start = self._sample()

    def _sample(self):
        t = os.times()
        busy, total = machine_cpu_seconds()
        return busy, total, process_cpu_seconds(self.pid), t.user + t.system

    def shares(self) -> dict:
        end = self._sample()
        d = [b - a for a, b in zip(self.start, end, strict=True)]
        total = d[1] or float("nan")
        return {
            "cpu_server": d[2] / total,
            "cpu_client": d[3] / total,
            "cpu_other": max(0.0, d[0] - d[2] - d[3]) / total,
        }


def other_cpu(interval: float = 1.0, pid: int | None = None) -> float:
    """Fraction of all cores' time used by processes other than this one and `pid` (a server
    of ours, which may poll while idle) during the next `interval` seconds."""
    meter = CpuMeter(pid or 0)
    time.sleep(interval)
    return meter.shares()["cpu_other"]


async def wait_quiet(
    limit_s: float, pid: int | None = None, threshold: float = 0.15, needed: int = 3
) -> float:
    """Wait (at most `limit_s`) until other processes leave the machine idle for `needed` seconds
    in a row: other people's work on a 2-core box skews every number. Returns the seconds waited."""
    t = time.monotonic()
    calm = 0
    while calm < needed and time.monotonic() - t < limit_s:
        busy = await asyncio.to_thread(other_cpu, 1.0, pid)
        calm = calm + 1 if busy < threshold else 0
    return time.monotonic() - t


class Server:
    """One system's server process, started and stopped by us."""

    live: set[Server] = set()  # stopped by main() whatever happens

    def __init__(self, system: System, checkpoint: Path, threads: int, log_dir: Path):
        self.system = system
        self.port = free_port()
        self.log_path = log_dir / f"{system.name}.log"
        env = dict(os.environ, **system.env())
        if threads:  # the same number of math threads for every server
            env.update(
                OMP_NUM_THREADS=str(threads),
                MKL_NUM_THREADS=str(threads),
                ML_SERVICE_TORCH_THREADS=str(threads),
            )
        env.pop("ML_SERVICE_PORT", None)
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


# --------------------------------------------------------------------------------------------
# load


@dataclass
class Run:
    system: str
    mode: str  # "closed" or "open"
    load: float  # clients, or requests/s
    duration: float
    results: list[RequestResult] = field(default_factory=list)
    cpu: dict = field(default_factory=dict)

    def summary(self) -> dict:
        ok = [r for r in self.results if r.ok]
        tokens = sum(r.completion_tokens for r in self.results)
        lat = np.array([r.latency for r in ok]) if ok else np.array([np.nan])
        ttfts = np.array([r.ttft for r in ok if r.ttft is not None])
        tpots = np.array(
            [
                (r.latency - r.ttft) / (r.completion_tokens - 1)
                for r in ok
                if r.ttft is not None and r.completion_tokens > 1
            ]
        )
        return {
            "system": self.system,
            "mode": self.mode,
            "load": self.load,
            "requests": len(self.results),
            "errors": len(self.results) - len(ok),
            "short": sum(1 for r in self.results if r.error.startswith("short")),
            "duration_s": self.duration,
            "output_tokens": tokens,
            "tok_s": tokens / self.duration,
            "req_s": len(ok) / self.duration,
            "lat_p50": float(np.percentile(lat, 50)),
            "lat_p95": float(np.percentile(lat, 95)),
            "lat_p99": float(np.percentile(lat, 99)),
            "ttft_p50": float(np.percentile(ttfts, 50)) if len(ttfts) else None,
            "ttft_p95": float(np.percentile(ttfts, 95)) if len(ttfts) else None,
            "tpot_p50": float(np.percentile(tpots, 50)) if len(tpots) else None,
            "prompt_tokens_mean": float(np.mean([r.prompt_tokens for r in ok])) if ok else 0.0,
            "error_samples": sorted({r.error for r in self.results if r.error})[:3],
            **self.cpu,
        }


async def timed(client, system, prompt, seed, max_new, stream) -> RequestResult:
    t0 = time.perf_counter()
    try:
        return await system.request(client, prompt, seed, max_new, stream)
    except Exception as e:  # a transport or protocol failure is one more error, not the end
        return RequestResult(False, time.perf_counter() - t0, error=f"{type(e).__name__}: {e}")


async def closed_loop(client, system, prompts, clients, total, max_new, stream, seed0) -> Run:
    counter = itertools.count()
    results: list[RequestResult] = []

    async def worker():
        while (i := next(counter)) < total:
            prompt = prompts[i % len(prompts)]
            results.append(await timed(client, system, prompt, seed0 + i, max_new, stream))

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(clients)))
    return Run(system.name, "closed", clients, time.perf_counter() - t0, results)


async def open_loop(client, system, prompts, rate, total, max_new, stream, seed0) -> Run:
    rng = random.Random(seed0)
    tasks = []
    t0 = time.perf_counter()
    at = 0.0
    for i in range(total):
        delay = t0 + at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        prompt = prompts[i % len(prompts)]
        tasks.append(asyncio.create_task(timed(client, system, prompt, seed0 + i, max_new, stream)))
        at += rng.expovariate(rate)
    results = await asyncio.gather(*tasks)
    return Run(system.name, "open", rate, time.perf_counter() - t0, list(results))


async def bench_system(system: System, args, prompts: list[str], log_dir: Path) -> list[Run]:
    waited = await wait_quiet(args.wait_quiet)
    if waited > 4:
        print(f"[{system.name}] waited {waited:.0f}s for a quiet machine", flush=True)
    server = Server(system, args.checkpoint, args.threads, log_dir)
    runs: list[Run] = []
    try:
        await server.wait_healthy()
        most = max([*args.concurrency, 8])
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=most + 8)
        timeout = httpx.Timeout(args.timeout, connect=30)
        async with httpx.AsyncClient(base_url=server.url, limits=limits, timeout=timeout) as client:
            # warm-up: a few lone requests, then a burst (not measured)
            t = time.perf_counter()
            warm = [
                await timed(client, system, prompts[i], 10**6 + i, args.max_new_tokens, True)
                for i in range(2)
            ]
            warm += await asyncio.gather(
                *(
                    timed(client, system, prompts[i], 10**6 + i, args.max_new_tokens, False)
                    for i in range(args.warmup_burst)
                )
            )
            bad = [r.error for r in warm if not r.ok]
            print(
                f"[{system.name}] up on :{server.port}, warm-up {time.perf_counter() - t:.1f}s"
                + (f", {len(bad)} warm-up errors: {bad[:2]}" if bad else ""),
                flush=True,
            )
            rows = [("closed", c) for c in args.concurrency] + [
                ("open", r) for r in args.rate or []
            ]
            for mode, load in rows:
                best: Run | None = None
                for attempt in range(args.retries + 1):
                    await wait_quiet(args.wait_quiet, server.proc.pid, needed=1)
                    meter = CpuMeter(server.proc.pid)
                    if mode == "closed":
                        total = max(args.min_requests, int(load) * args.requests_per_client)
                        run = await closed_loop(
                            client, system, prompts, int(load), total, args.max_new_tokens,
                            args.stream, 0,
                        )  # fmt: skip
                    else:
                        run = await open_loop(
                            client, system, prompts, load, args.num_requests, args.max_new_tokens,
                            args.stream, 0,
                        )  # fmt: skip
                    run.cpu = meter.shares()
                    print(format_line(run.summary()), flush=True)
                    if best is None or run.cpu["cpu_other"] < best.cpu["cpu_other"]:
                        best = run  # the least disturbed attempt
                    if run.cpu["cpu_other"] <= args.max_other_cpu:
                        break
                    if attempt < args.retries:
                        print(
                            f"    other processes took {run.cpu['cpu_other']:.0%} of the CPU: "
                            "waiting for a quiet machine, then again",
                            flush=True,
                        )
                runs.append(best)
    finally:
        server.stop()
    return runs


def format_line(s: dict) -> str:
    load = f"c={s['load']:g}" if s["mode"] == "closed" else f"rate={s['load']:g}/s"
    ttft = f" ttft50={s['ttft_p50'] * 1e3:.0f}ms" if s["ttft_p50"] is not None else ""
    tpot = f" tpot50={s['tpot_p50'] * 1e3:.1f}ms" if s["tpot_p50"] is not None else ""
    errs = f" errors={s['errors']}" + (f" {s['error_samples']}" if s["errors"] else "")
    if "cpu_other" in s:
        errs += (
            f" cpu: server {s['cpu_server']:.0%} client {s['cpu_client']:.0%}"
            f" other {s['cpu_other']:.0%}"
        )
    return (
        f"  {s['system']:<13} {load:<12} n={s['requests']:<4} {s['tok_s']:8.1f} tok/s "
        f"{s['req_s']:6.2f} req/s  p50={s['lat_p50']:.2f}s p95={s['lat_p95']:.2f}s "
        f"p99={s['lat_p99']:.2f}s{ttft}{tpot}{errs}"
    )


# --------------------------------------------------------------------------------------------
# report


def machine_info(threads: int | None, device: str = "cpu", dtype: str = "float32") -> str:
    import torch
    import transformers

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    if device.startswith("cuda") and torch.cuda.is_available():
        where = f"{torch.cuda.get_device_name(0)} ({dtype} weights) with {cpu}"
    else:
        where = f"{cpu}, {os.cpu_count()} cores ({platform.machine()}), no GPU"
        where += f" ({dtype} weights)" if dtype != "float32" else ""
    return (
        f"{where}; "
        f"Python {platform.python_version()}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}; "
        + (
            f"every server with {threads} math threads (OMP_NUM_THREADS / "
            f"ML_SERVICE_TORCH_THREADS={threads})"
            if threads
            else "every server with its default threads (the peer: torch's, all "
            f"{os.cpu_count()} cores; ours: all cores but one for the model, the last for HTTP)"
        )
        + "; one server at a time; the client is one asyncio + httpx process"
    )


def ratios(summaries: list[dict]) -> tuple[list[str], list[str]]:
    """Lines comparing with the targets, and the failures among them."""
    closed = {(s["system"], s["load"]): s for s in summaries if s["mode"] == "closed"}
    lines, failed = [], []

    def check(ok: bool, text: str) -> None:
        lines.append(f"- {'met' if ok else '**not met**'}: {text}")
        if not ok:
            failed.append(text)

    for c in (16, 64):
        ours = closed.get(("ours", c))
        if ours is None:
            continue
        peers = [closed[k] for k in (("tf-serve", c), ("tf-serve-cb", c)) if k in closed]
        if peers:
            best = max(peers, key=lambda s: s["tok_s"])
            r = ours["tok_s"] / best["tok_s"]
            check(
                r >= 1.25 and ours["lat_p95"] <= best["lat_p95"],
                f"{c} clients, ours / best `transformers serve` ({best['system']}): throughput "
                f"{r:.2f}x (target ≥ 1.25x), p95 latency {ours['lat_p95']:.2f}s vs "
                f"{best['lat_p95']:.2f}s (target: no worse)",
            )
        nob = closed.get(("ours-nobatch", c))
        if nob is not None:
            r = ours["tok_s"] / nob["tok_s"]
            check(r >= 5, f"{c} clients, ours / ours-nobatch throughput {r:.2f}x (target ≥ 5x)")
    ours1, nob1 = closed.get(("ours", 1)), closed.get(("ours-nobatch", 1))
    if ours1 and nob1:
        r = ours1["lat_p50"] / nob1["lat_p50"]
        r95 = ours1["lat_p95"] / nob1["lat_p95"]
        check(
            r <= 1.10,
            f"1 client, ours / ours-nobatch latency p50 {r:.3f} (p95 {r95:.3f}) (target ≤ 1.10)",
        )
    errors = sum(s["errors"] for s in summaries)
    ours_errors = sum(s["errors"] for s in summaries if s["system"].startswith("ours"))
    check(
        ours_errors == 0, f"errors: {ours_errors} in our service, {errors} in all runs (target 0)"
    )
    return lines, failed


def markdown(summaries, args, command, info, elapsed, plot_rel, systems) -> str:
    def ms(x):
        return "—" if x is None else f"{x * 1e3:,.0f} ms"

    def ms1(x):
        return "—" if x is None else f"{x * 1e3:.1f} ms"

    def cpu(s):
        if "cpu_other" not in s:
            return "—"
        return f"{s['cpu_server']:.0%} / {s['cpu_client']:.0%} / {s['cpu_other']:.0%}"

    rows = [
        f"| {s['system']} | {('' if s['mode'] == 'closed' else 'open loop, ')}"
        f"{s['load']:g}{'' if s['mode'] == 'closed' else ' req/s'} | {s['requests']} | "
        f"{s['tok_s']:,.0f} | {s['req_s']:.2f} | {s['lat_p50']:.2f} / {s['lat_p95']:.2f} / "
        f"{s['lat_p99']:.2f} | {ms(s['ttft_p50'])} | {ms1(s['tpot_p50'])} | {s['errors']} | "
        f"{cpu(s)} |"
        for s in summaries
    ]
    lines, _ = ratios(summaries)
    short = [s for s in summaries if s["short"]]
    widest = {}  # per system, the row with the most requests (all prompts, equally often)
    for s in summaries:
        if s["requests"] > widest.get(s["system"], {"requests": -1})["requests"]:
            widest[s["system"]] = s
    means = {round(s["prompt_tokens_mean"], 1) for s in widest.values() if s["prompt_tokens_mean"]}
    prompt_tokens = " / ".join(f"{m:g}" for m in sorted(means)) or "?"
    ckpt = str(args.checkpoint)
    out = [
        SECTION_START,
        "## Serving",
        "",
        f"Machine: {info}.  ",
        f"Checkpoint `{ckpt}`, {args.max_new_tokens} new tokens per request (exactly: EOS is held "
        f"off), temperature {TEMPERATURE}, {'streamed (SSE)' if args.stream else 'not streamed'}; "
        f"{len(args.prompts)} fixed Russian prompts from the validation split of "
        f"the bundled corpus (at most {args.prompt_chars} characters, cut at a word; "
        f"{prompt_tokens} prompt tokens on average, by each system's count). Closed loop: "
        f"N clients, each sending its next request when the previous one is answered, "
        f"max({args.min_requests}, {args.requests_per_client}·N) requests per row."
        + (
            f" Open loop: Poisson arrivals at R requests/s, {args.num_requests} requests per row."
            if args.rate
            else ""
        )
        + f" Whole run: {elapsed / 60:.1f} min.",
        "",
        f"Command: `{command}`",
        "",
        "| system | clients | requests | output tok/s | req/s | latency p50 / p95 / p99 (s) "
        "| TTFT p50 | TPOT p50 | errors | CPU server / client / other |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        *rows,
        "",
        "Against the targets ("
        + (f"{os.cpu_count()}-core CPU" if args.device == "cpu" else args.device)
        + f", {args.max_new_tokens} new tokens):",
        "",
        *lines,
        "",
    ]
    if plot_rel:
        out += [f"![serving throughput and p95 latency against concurrency]({plot_rel})", ""]
    out += [
        "How the systems were run (each on a free port, `HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1` "
        "for the peer, nothing downloaded):",
        "",
    ]
    for system in systems:
        out.append(f"- `{system.name}`: {system.description}: `{system.display_command(ckpt)}`")
    out += [
        "",
        "Notes:",
        "",
        '- Ours: `POST /forward` with `{"text", "max_new_tokens": 64, "min_new_tokens": 64, '
        '"temperature": 0.8, "seed": i}` (plus `"stream": true`); the service\'s defaults give '
        "top-p 0.95, top-k 50, repetition penalty 1.1.",
        "- `transformers serve`: `POST /v1/completions` (the OpenAI legacy completions endpoint: "
        "a raw prompt, no chat template) with `prompt`, `max_tokens`, `seed` and "
        "`generation_config`, a JSON string that replaces the model's generation config: the "
        "checkpoint's own (top-p 0.95, top-k 50, repetition penalty 1.1) with temperature 0.8, "
        "`max_new_tokens` 64 and `min_new_tokens` 64. With `--continuous-batching` the server "
        "drops the logits processors it does not support (`min_new_tokens`, "
        "`repetition_penalty`): those are left out, `eos_token_id: -1` makes it ignore EOS "
        "instead, and it runs without the repetition penalty the other three apply.",
        "- Output tokens are counted from each response's `usage.completion_tokens`; a response "
        "with a status other than 200, an error event or fewer tokens than asked counts as an "
        "error (its tokens still count toward tok/s)."
        + (
            " Short responses: "
            + ", ".join(f"{s['system']} at {s['load']:g}: {s['short']}" for s in short)
            + "."
            if short
            else " No response was short."
        ),
        "- Throughput is output tokens over the wall time of the row (first request sent to last "
        "answer); TTFT is the time to the first non-empty piece of text; TPOT is "
        "(latency − TTFT) / (tokens − 1) per request. Latencies are end to end, seen by the client.",
        "- CPU: the share of both cores' time, during the row, used by the server process, by the "
        "load-generating client and by anything else on the machine (from /proc). The script "
        "waits for an idle machine before each server and row, and runs a row again (up to "
        f"{args.retries} times) when other processes took more than {args.max_other_cpu:.0%}.",
        "",
        SECTION_END,
    ]
    return "\n".join(out) + "\n"


def replace_section(path: Path, section: str) -> None:
    """Write `section` in `path` in place of the previous one (between its markers, or else an
    unmarked `## Serving` section up to the next `## ` heading), or at the end; every other
    section is left alone."""
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
    marked = re.compile(re.escape(SECTION_START) + r".*?" + re.escape(SECTION_END) + r"\n*", re.S)
    unmarked = re.compile(r"^## Serving[ \t]*\n.*?(?=^## |\Z)", re.S | re.M)
    for pattern in (marked, unmarked):
        if pattern.search(text):
            text = pattern.sub(lambda _: section + "\n", text, count=1)
            break
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text.rstrip("\n") + "\n", encoding="utf-8")


def plot(summaries: list[dict], path: Path, title: str) -> bool:
    closed = [s for s in summaries if s["mode"] == "closed"]
    if not closed:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.6), dpi=80)
    for name in dict.fromkeys(s["system"] for s in closed):
        pts = sorted((s["load"], s["tok_s"], s["lat_p95"]) for s in closed if s["system"] == name)
        xs = [p[0] for p in pts]
        ax1.plot(xs, [p[1] for p in pts], marker="o", label=name)
        ax2.plot(xs, [p[2] for p in pts], marker="o", label=name)
    for ax, ylabel in ((ax1, "output tokens/s"), (ax2, "p95 latency (s)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({s["load"] for s in closed}))
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
    ax2.set_yscale("log")
    ax2.yaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    ax2.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda y, _: f"{y:g}"))
    ax2.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax1.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return True


# --------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--checkpoint", type=Path, default=Path("models/default"))
    p.add_argument("--device", default="cpu", help="every server's torch device, e.g. cuda")
    p.add_argument(
        "--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="weights"
    )
    p.add_argument(
        "--systems", nargs="+", choices=SYSTEM_NAMES, default=list(SYSTEM_NAMES), metavar="SYSTEM"
    )
    p.add_argument(
        "--concurrency",
        type=int,
        nargs="*",
        help="closed-loop client counts (default 1 4 16 64; none when only --rate is given)",
    )
    p.add_argument("--requests-per-client", type=int, default=8)
    p.add_argument("--min-requests", type=int, default=48, help="fewest requests per closed row")
    p.add_argument("--rate", type=float, nargs="+", help="open loop: Poisson arrival rates (req/s)")
    p.add_argument("--num-requests", type=int, default=64, help="open loop: requests per rate")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--stream", action="store_true", help="stream (SSE): adds TTFT and TPOT")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--prompt-chars", type=int, default=160)
    p.add_argument("--val-fraction", type=float, default=0.05, help="as the training default")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="math threads for every server (OMP_NUM_THREADS for the peer, "
        "ML_SERVICE_TORCH_THREADS for ours); default: each server's own default",
    )
    p.add_argument("--warmup-burst", type=int, default=8)
    p.add_argument("--timeout", type=float, default=600, help="seconds per request")
    p.add_argument(
        "--wait-quiet",
        type=float,
        default=300,
        help="before each server and row, wait up to this many seconds for an idle machine",
    )
    p.add_argument(
        "--max-other-cpu",
        type=float,
        default=0.10,
        help="a row during which other processes used more of the CPU than this is run again",
    )
    p.add_argument(
        "--retries",
        type=int,
        default=3,
        help="re-runs of a noisy row (the least disturbed attempt is kept)",
    )
    p.add_argument("--write", type=Path, help="replace the Serving section of this markdown file")
    p.add_argument("--plot", type=Path, help="PNG: throughput and p95 latency vs concurrency")
    p.add_argument("--json", type=Path, help="also save the per-row summaries as JSON")
    args = p.parse_args(argv)
    if args.concurrency is None:
        args.concurrency = [] if args.rate else [1, 4, 16, 64]
    if not args.concurrency and not args.rate:
        p.error("nothing to run: give --concurrency and/or --rate")
    return args


async def amain(args) -> int:
    t_start = time.perf_counter()
    args.prompts = validation_prompts(args.num_prompts, args.prompt_chars, args.val_fraction)
    systems = make_systems(args.systems, args.checkpoint, args.device, args.dtype)
    summaries: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="serve_bench_") as tmp:
        for system in systems:
            try:
                runs = await bench_system(system, args, args.prompts, Path(tmp))
            except Exception as e:
                print(f"[{system.name}] failed: {e}", file=sys.stderr)
                return 1
            summaries += [r.summary() for r in runs]
    elapsed = time.perf_counter() - t_start
    command = "python bench/serve_bench.py " + shlex.join(sys.argv[1:])
    info = machine_info(args.threads, args.device, args.dtype)
    lines, failed = ratios(summaries)
    print(f"\n{info}\nwhole run {elapsed / 60:.1f} min\n" + "\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps(summaries, indent=1))
    plot_rel = None
    if args.plot and plot(
        summaries,
        args.plot,
        f"{args.checkpoint}, {args.max_new_tokens} new tokens/request, "
        + (args.device if args.device != "cpu" else f"{os.cpu_count()}-core CPU"),
    ):
        print(f"plot: {args.plot} ({args.plot.stat().st_size / 1024:.0f} KB)")
        if args.write:
            plot_rel = os.path.relpath(args.plot.resolve(), args.write.resolve().parent)
    if args.write:
        replace_section(
            args.write, markdown(summaries, args, command, info, elapsed, plot_rel, systems)
        )
        print(f"wrote the Serving section of {args.write}")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)

    def interrupt(*_):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)  # stopped like Ctrl-C: the servers go down too
    try:
        return asyncio.run(amain(args))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        for server in list(Server.live):
            server.stop()


if __name__ == "__main__":
    sys.exit(main())
