"""The load: the prompts, CPU metering from /proc (and waiting for a quiet machine), the closed-
and open-loop generators, `Run` (one row and its summary) and `bench_system`, which warms one
server up and runs its rows, each the least disturbed of its attempts."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np

from .report import format_line
from .systems import RequestResult, Server, System, proc_stat, process_tree

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
# CPU metering

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
    """User + system CPU seconds of one process and its descendants (all their threads), from
    /proc (a process that exited since is not counted)."""
    total = 0
    for p in process_tree(pid) if pid else []:
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = proc_stat(p)
            total += int(fields[11]) + int(fields[12])
    return total / TICK


class CpuMeter:
    """How the machine's CPU was shared during a row: the server (its processes), this client,
    and the rest (other people's work, which makes the row noisy), as fractions of all cores'
    time."""

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


# --------------------------------------------------------------------------------------------
# load


def _percentile(values: np.ndarray, q: float) -> float | None:
    return float(np.percentile(values, q)) if len(values) else None


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
            "lat_p50": _percentile(lat, 50),
            "lat_p95": _percentile(lat, 95),
            "lat_p99": _percentile(lat, 99),
            "ttft_p50": _percentile(ttfts, 50),
            "ttft_p95": _percentile(ttfts, 95),
            "tpot_p50": _percentile(tpots, 50),
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


# --------------------------------------------------------------------------------------------
# one system: warm-up, then every row


async def warm_up(client, system: System, args, prompts: list[str], port: int, up: float) -> None:
    """The request's extension fields agreed on, a few lone requests, then a burst (none of
    it measured)."""
    t = time.perf_counter()
    await system.negotiate(client, prompts[0])
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
        f"[{system.name}] up on :{port} after {up:.0f}s, warm-up {time.perf_counter() - t:.1f}s"
        + (f", {len(bad)} warm-up errors: {bad[:2]}" if bad else ""),
        flush=True,
    )


async def attempt_row(client, system: System, args, prompts, pid: int, mode, load) -> Run:
    """One attempt at a row, after waiting for a quiet machine, with the CPU shares it saw."""
    await wait_quiet(args.wait_quiet, pid, needed=1)
    meter = CpuMeter(pid)
    if mode == "closed":
        total = max(args.min_requests, int(load) * args.requests_per_client)
        run = await closed_loop(
            client, system, prompts, int(load), total, args.max_new_tokens, args.stream, 0
        )
    else:
        run = await open_loop(
            client, system, prompts, load, args.num_requests, args.max_new_tokens, args.stream, 0
        )
    run.cpu = meter.shares()
    print(format_line(run.summary()), flush=True)
    return run


async def best_row(client, system: System, args, prompts, pid: int, mode, load) -> Run:
    """The row, run again (up to `--retries` times) while other processes took more than
    `--max-other-cpu` of the CPU: the least disturbed attempt."""
    best: Run | None = None
    for attempt in range(args.retries + 1):
        run = await attempt_row(client, system, args, prompts, pid, mode, load)
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
    return best


async def bench_system(system: System, args, prompts: list[str], log_dir: Path) -> list[Run]:
    waited = await wait_quiet(args.wait_quiet)
    if waited > 4:
        print(f"[{system.name}] waited {waited:.0f}s for a quiet machine", flush=True)
    started = time.perf_counter()
    server = Server(system, args.checkpoint, args.threads, log_dir)
    try:
        await server.wait_healthy()
        up = time.perf_counter() - started
        most = max([*args.concurrency, 8])
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=most + 8)
        timeout = httpx.Timeout(args.timeout, connect=30)
        async with httpx.AsyncClient(base_url=server.url, limits=limits, timeout=timeout) as client:
            await warm_up(client, system, args, prompts, server.port, up)
            rows = [("closed", c) for c in args.concurrency]
            rows += [("open", r) for r in args.rate or []]
            pid = server.proc.pid
            return [
                await best_row(client, system, args, prompts, pid, mode, load)
                for mode, load in rows
            ]
    finally:
        server.stop()
