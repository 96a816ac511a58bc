"""What the fleet features cost and save, measured on real processes: our server (serve.py) with
a real `redis-server`, one client, one request at a time (latency, not throughput).

- Response cache: a greedy `/forward` of `--max-new-tokens` tokens answered by the model
  (`"cache": false`) against the same request answered from the cache, in memory and in Redis.
- Shared rate limits: a 1-token `/forward` with `ML_SERVICE_RATE_LIMIT` counted in memory against
  counted in Redis (the moving window's round trip on every request).

    python bench/fleet_bench.py                       # prints a Markdown table
    python bench/fleet_bench.py --write BENCHMARKS.md # also rewrites its section there

Needs `redis-server` on PATH (`make redis-server`).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.sections import replace_marked  # noqa: E402
from bench.serving.systems import free_port  # noqa: E402
from lib.presets import DEFAULT_CHECKPOINT  # noqa: E402

START, END = "<!-- fleet_bench:start -->", "<!-- fleet_bench:end -->"


def wait_until(condition, what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise SystemExit(f"not within {timeout:g} s: {what}")
        time.sleep(0.05)


@contextmanager
def redis_server():
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("no redis-server on PATH: make redis-server")
    port, workdir = free_port(), tempfile.mkdtemp(prefix="redis-bench-")
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", workdir],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        import redis

        client = redis.Redis(port=port, socket_timeout=0.5)

        def answers() -> bool:
            try:
                return bool(client.ping())
            except redis.RedisError:
                return False

        wait_until(answers, "redis-server answers")
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)


@contextmanager
def server(checkpoint: Path, env: dict[str, str]):
    port = free_port()
    full_env = {**os.environ, "ML_SERVICE_LOG_LEVEL": "warning", **env}
    proc = subprocess.Popen(
        [sys.executable, "serve.py", "--checkpoint", str(checkpoint), "--port", str(port)],
        cwd=REPO,
        env=full_env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        try:
            return httpx.get(f"{url}/ready", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_until(ready, "the server is ready")
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)


def latencies(url: str, body: dict, n: int, expect_cache: str | None) -> list[float]:
    out = []
    with httpx.Client(base_url=url, timeout=120) as http:
        for _ in range(n):
            t0 = time.perf_counter()
            r = http.post("/forward", json=body)
            out.append(time.perf_counter() - t0)
            if r.status_code != 200 or (expect_cache and r.headers["x-cache"] != expect_cache):
                raise SystemExit(f"unexpected answer: {r.status_code} {r.headers} {r.text[:200]}")
    return out


def row(what: str, times: list[float]) -> str:
    ms = sorted(t * 1000 for t in times)
    p95 = ms[min(len(ms) - 1, int(0.95 * len(ms)))]
    return f"| {what} | {len(ms)} | {statistics.median(ms):.2f} | {p95:.2f} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--write", type=Path, help="rewrite the fleet_bench section of this file")
    args = parser.parse_args()

    greedy = {
        "text": "Москва — столица",
        "max_new_tokens": args.max_new_tokens,
        "min_new_tokens": args.max_new_tokens,
        "temperature": 0,
    }
    tiny = {"text": "а", "max_new_tokens": 1, "temperature": 0, "cache": False}
    rows = []
    with redis_server() as redis_url:
        for where, env in (("memory", {}), ("Redis", {"ML_SERVICE_REDIS_URL": redis_url})):
            with server(args.checkpoint, env) as url:
                n = args.requests
                ran = latencies(url, {**greedy, "cache": False}, n // 4, "bypass")
                latencies(url, greedy, 1, "miss")  # stored
                hit = latencies(url, greedy, n, "hit")
                if where == "memory":
                    rows.append(row(f"{args.max_new_tokens} tokens, run by the model", ran))
                rows.append(row(f"the same, answered from the cache in {where}", hit))
        limit = {"ML_SERVICE_RATE_LIMIT": "1000000/minute"}
        for where, env in (
            ("memory", limit),
            ("Redis", {**limit, "ML_SERVICE_REDIS_URL": redis_url}),
        ):
            with server(args.checkpoint, env) as url:
                latencies(url, tiny, 20, "bypass")  # warm
                times = latencies(url, tiny, args.requests, "bypass")
                rows.append(row(f"1 token, rate limit counted in {where}", times))

    table = "\n".join(
        [
            "| request | n | p50 ms | p95 ms |",
            "| --- | --- | --- | --- |",
            *rows,
        ]
    )
    command = f"`python bench/fleet_bench.py --requests {args.requests} --max-new-tokens {args.max_new_tokens}`"
    section = (
        f"{START}\nCommand: {command} (one client, one request at a time, end-to-end over local "
        f"HTTP; server and redis-server on the same 2-core machine; {time.strftime('%Y-%m-%d')}).\n\n"
        f"{table}\n{END}"
    )
    print(section)
    if args.write:
        text = replace_marked(args.write.read_text(), section, START, END)
        if text is None:
            text = (
                args.write.read_text().rstrip("\n")
                + "\n\n## Fleet: response cache and shared rate limits\n\n"
                + section
                + "\n"
            )
        args.write.write_text(text)


if __name__ == "__main__":
    main()
