"""How long requests the service refuses hold its event loop (issue 32, item 3): `/health`
latency, probed one call at a time, while `--clients` clients keep sending prompts that cannot fit
the context (each answered 400), on a real server (serve.py, the default checkpoint).

Each load runs for `--seconds`: `/v1/completions` with 64 prompts of 8,000 characters (a 512 KB
body), `/forward_batch` with the same texts, `/v1/chat/completions` with one message of 7,900
characters, `/forward` with one text of 8,000 characters; and, first, no load at all.

    python bench/loop_block_bench.py                           # this checkout's server
    python bench/loop_block_bench.py --repo /tmp/before        # another checkout's (a git worktree)
    python bench/loop_block_bench.py --seconds 5 --clients 8   # shorter

The load runs in a process of its own (its threads would otherwise delay the probe's own
timing); the probe sends GET /health every `--interval-ms` and times each answer.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import signal
import statistics
import string
import subprocess
import sys
import threading
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.serving.systems import free_port  # noqa: E402

PROMPT_CHARS = 8000  # ML_SERVICE_MAX_TEXT_CHARS' default: each text passes the character limit
PROMPTS = 64  # ML_SERVICE_MAX_TEXTS' default


def words_text(rng: random.Random, chars: int) -> str:
    """`chars` characters of made-up Latin words: for the default (Russian) tokenizer about one
    token per character, so about 30 times what its 256-token context holds."""
    words = []
    while sum(len(w) + 1 for w in words) < chars:
        words.append("".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 9))))
    return " ".join(words)[:chars]


def loads(seed: int = 0) -> dict[str, tuple[str, bytes]]:
    """The refused requests, by name: (path, JSON body)."""
    rng = random.Random(seed)
    texts = [words_text(rng, PROMPT_CHARS) for _ in range(PROMPTS)]
    bodies = {
        "/v1/completions, 64 x 8,000 chars": (
            "/v1/completions",
            {"prompt": texts, "max_tokens": 16},
        ),
        "/forward_batch, 64 x 8,000 chars": (
            "/forward_batch",
            {"texts": texts, "max_new_tokens": 16},
        ),
        "/v1/chat/completions, 7,900 chars": (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": texts[0][:7900]}], "max_tokens": 16},
        ),
        "/forward, 8,000 chars": ("/forward", {"text": texts[0], "max_new_tokens": 16}),
    }
    return {name: (path, json.dumps(body).encode()) for name, (path, body) in bodies.items()}


def send_load(url: str, path: str, body: bytes, clients: int, stop, statuses) -> None:
    """`clients` threads, each sending `body` to `path` again and again until `stop` is set;
    the answers' statuses are counted into `statuses` (a shared dict)."""
    counts: Counter = Counter()
    lock = threading.Lock()

    def client() -> None:
        with httpx.Client(base_url=url, timeout=120) as http:
            while not stop.is_set():
                r = http.post(path, content=body, headers={"content-type": "application/json"})
                with lock:
                    counts[r.status_code] += 1

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    statuses.update({str(k): v for k, v in counts.items()})


def probe(url: str, seconds: float, interval: float) -> list[float]:
    """GET /health every `interval` seconds for `seconds`, one at a time: each answer's time."""
    times = []
    deadline = time.monotonic() + seconds
    with httpx.Client(base_url=url, timeout=120) as http:
        while time.monotonic() < deadline:
            t0 = time.perf_counter()
            r = http.get("/health")
            times.append(time.perf_counter() - t0)
            if r.status_code != 200:
                raise SystemExit(f"/health answered {r.status_code}: {r.text[:200]}")
            time.sleep(max(0.0, interval - times[-1]))
    return times


def measure(url: str, load, args) -> tuple[list[float], dict]:
    """/health times while `load` ((path, body), or None) runs, and the load's statuses."""
    if load is None:
        return probe(url, args.seconds, args.interval_ms / 1000), {}
    ctx = multiprocessing.get_context("spawn")
    stop, statuses = ctx.Event(), ctx.Manager().dict()
    sender = ctx.Process(target=send_load, args=(url, *load, args.clients, stop, statuses))
    sender.start()
    try:
        time.sleep(1.0)  # the clients are connected and sending
        times = probe(url, args.seconds, args.interval_ms / 1000)
    finally:
        stop.set()
        sender.join(180)
    return times, dict(statuses)


@contextmanager
def server(repo: Path, checkpoint: Path | None):
    """serve.py of the checkout `repo`, with its default settings, until the block ends."""
    port = free_port()
    env = {**os.environ, "ML_SERVICE_LOG_LEVEL": "warning", "PYTHONPATH": str(repo)}
    cmd = [sys.executable, "serve.py", "--port", str(port)]
    if checkpoint is not None:
        cmd += ["--checkpoint", str(checkpoint)]
    proc = subprocess.Popen(cmd, cwd=repo, env=env, stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the server did not become ready")
            time.sleep(0.2)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)


def row(what: str, times: list[float], statuses: dict) -> str:
    ms = sorted(t * 1000 for t in times)
    p99 = ms[min(len(ms) - 1, int(0.99 * len(ms)))]
    answered = ", ".join(f"{n} x {code}" for code, n in sorted(statuses.items())) or "-"
    return (
        f"| {what} | {answered} | {len(ms)} | {statistics.median(ms):.1f} | {p99:.1f} "
        f"| {ms[-1]:.1f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repo", type=Path, default=REPO, help="the checkout whose server runs")
    parser.add_argument("--checkpoint", type=Path, help="default: the checkout's default model")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=8.0, help="each load's probe time")
    parser.add_argument("--interval-ms", type=float, default=20.0)
    args = parser.parse_args()

    rows = []
    with server(args.repo.resolve(), args.checkpoint) as url:
        rows.append(row("no load", *measure(url, None, args)))
        for name, load in loads().items():
            rows.append(row(f"{args.clients} clients: {name}", *measure(url, load, args)))
    table = "\n".join(
        [
            "| load | its answers | /health calls | p50 ms | p99 ms | max ms |",
            "| --- | --- | --- | --- | --- | --- |",
            *rows,
        ]
    )
    command = (
        f"`python bench/loop_block_bench.py --clients {args.clients} --seconds {args.seconds:g}`"
    )
    print(
        f"Command: {command} (server: {args.repo.resolve()}; load, probe and server on one "
        f"machine, {os.cpu_count()} cores; {time.strftime('%Y-%m-%d')}).\n\n{table}"
    )


if __name__ == "__main__":
    main()
