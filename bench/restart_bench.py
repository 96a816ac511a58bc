"""How long the engine process takes to come back after `kill -9`, while clients stream.

A real server (serve.py, `ML_SERVICE_ENGINE=process`, the default checkpoint) and `--clients`
streaming clients (httpx, in a process of their own) that keep sending `/forward` streams, each
again as soon as the last one ended, refused or failed (they do not wait for `Retry-After`: the
worst case). The engine process is killed with SIGKILL once with no clients, then `--kills`
times while they stream (each `--settle` s after the last restart), then once more as soon as it
is back. Before each kill but the last, the bench waits until the server's standby worker (the
process launched ahead to replace a dead engine: lib/inference/engine_process/launch.py) has
imported, i.e. waits on its pipe; the last kill is the worst case, its standby still importing.
For each kill, from the kill:

- `/ready` 200: polled every 20 ms by this process (a client of its own);
- the first token: the first `token` event of a stream sent after the kill;
- the phases of the restart, from the server's log line that announces it: death noticed, the
  requests it held failed, the new process launched (before the kill, for a standby), its
  imports done, its spec received, its model loaded, warmed up, ready; the log's times are the
  system's monotonic clock, as this process's.

    python bench/restart_bench.py                         # prints a Markdown table
    python bench/restart_bench.py --write BENCHMARKS.md   # also rewrites its section there
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
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

START, END = "<!-- restart_bench:start -->", "<!-- restart_bench:end -->"
WORKER = "lib.inference.engine_process.worker"
# the server's restart line: "... restarted in 3.21 s (phases: noticed=12.345 ... ready=15.555)"
PHASES = re.compile(r"phases: ([^)]*)\)")
PROMPTS = ["Привет, мир!", "Москва", "Он сказал", "Сегодня утром", "Она открыла дверь"]


def wait_until(condition, what: str, timeout: float = 180.0, every: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise SystemExit(f"not within {timeout:g} s: {what}")
        time.sleep(every)


# -- the load: its own process, so that this one polls /ready on a core of its own ---------------
async def one_client(url: str, i: int, max_new_tokens: int, out) -> None:
    body = {
        "text": PROMPTS[i % len(PROMPTS)],
        "max_new_tokens": max_new_tokens,
        "temperature": 0.8,
        "seed": i,
        "stream": True,
        "cache": False,  # a seeded request is cached: every one must reach the engine
    }
    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        while True:
            sent = time.monotonic()
            status, first = "failed", None
            try:
                async with http.stream("POST", "/forward", json=body) as r:
                    if r.status_code != 200:
                        await r.aread()
                        status = f"http_{r.status_code}"
                    else:
                        status = "done"
                        async for line in r.aiter_lines():
                            if line == "event: token" and first is None:
                                first = time.monotonic()
                            elif line == "event: error":
                                status = "error_event"
            except httpx.HTTPError:
                pass
            out.write(json.dumps([sent, first, time.monotonic(), status]) + "\n")
            out.flush()


async def load(url: str, clients: int, max_new_tokens: int, path: str) -> None:
    with open(path, "a") as out:
        await asyncio.gather(*(one_client(url, i, max_new_tokens, out) for i in range(clients)))


@contextmanager
def load_process(url: str, clients: int, max_new_tokens: int, path: str):
    cmd = [sys.executable, __file__, "--load", url, "--clients", str(clients)]
    cmd += ["--max-new-tokens", str(max_new_tokens), "--events", path]
    proc = subprocess.Popen(cmd)
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


class Events:
    """The load's records (`[sent, first_token_or_null, ended, status]` lines), read as they
    come."""

    def __init__(self, path: str):
        self.path, self.offset, self.rows = path, 0, []

    def read(self) -> list:
        with open(self.path) as f:
            f.seek(self.offset)
            chunk = f.read()
        complete = chunk[: chunk.rfind("\n") + 1]
        self.offset += len(complete.encode())
        self.rows += [json.loads(line) for line in complete.splitlines()]
        return self.rows

    def first_token_after(self, t: float) -> float | None:
        firsts = [r[1] for r in self.read() if r[0] > t and r[1] is not None]
        return min(firsts) if firsts else None


# -- the server ----------------------------------------------------------------------------------
@contextmanager
def server(checkpoint: Path, log_path: str):
    port = free_port()
    env = {**os.environ, "ML_SERVICE_ENGINE": "process", "ML_SERVICE_LOG_LEVEL": "info"}
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "serve.py", "--checkpoint", str(checkpoint), "--port", str(port)],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: ready(url), "the server is ready")
        yield proc, url
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)


def ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/ready", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def log_lines(path: str) -> list[str]:
    return Path(path).read_text(errors="replace").splitlines()


def workers(server_pid: int) -> list[int]:
    """The server's children that run the worker module, oldest first: the engine process, then
    the standby where the server keeps one (it is launched after the engine it would replace)."""
    found = []
    for task in Path(f"/proc/{server_pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            try:
                cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
                started = int(Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[19])
            except OSError:
                continue
            if WORKER.encode() in cmdline:
                found.append((started, int(child)))
    return [pid for _, pid in sorted(found)]


def standby_waits(server_pid: int) -> bool:
    """Whether the server's standby has imported and waits for its spec (blocked reading its
    pipe), or there is no standby."""
    pids = workers(server_pid)
    if len(pids) < 2:
        return True
    try:
        return "pipe" in Path(f"/proc/{pids[1]}/wchan").read_text()
    except OSError:
        return False


def restart_phases(path: str, seen: int) -> dict[str, float] | None:
    """The phases of the server's restart line number `seen` (absolute monotonic times)."""
    found = [m.group(1) for line in log_lines(path) if (m := PHASES.search(line))]
    if len(found) <= seen:
        return None
    return {k: float(v) for k, v in (kv.split("=") for kv in found[seen].split())}


# -- CPU accounting ------------------------------------------------------------------------------
def cpu_times() -> tuple[float, float]:
    """(busy, total) jiffies of all cores, from /proc/stat."""
    fields = [float(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


def one_kill(url: str, server_pid: int, log_path: str, events: Events | None, n: int) -> dict:
    """Kill the engine process (restart number `n` of the server) and time its return."""
    pid = workers(server_pid)[0]
    load_avg = os.getloadavg()[0]
    busy0, total0 = cpu_times()
    os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    with httpx.Client(base_url=url, timeout=10) as http:
        wait_until(lambda: http.get("/ready").status_code != 200, "/ready notices", every=0.005)
        wait_until(lambda: http.get("/ready").status_code == 200, "/ready is 200", every=0.02)
    row = {"ready": time.monotonic() - killed, "load": load_avg}
    busy1, total1 = cpu_times()
    row["cpu"] = (busy1 - busy0) / max(1.0, total1 - total0)
    if events is not None:
        wait_until(lambda: events.first_token_after(killed) is not None, "a token after the kill")
        row["token"] = events.first_token_after(killed) - killed
    wait_until(lambda: workers(server_pid)[:1] not in ([pid], []), "the new engine process")
    phases = restart_phases(log_path, n)
    if phases:
        row["phases"] = {k: v - killed for k, v in phases.items()}
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--kills", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--settle", type=float, default=5.0, help="seconds of streaming per kill")
    parser.add_argument("--write", type=Path, help="rewrite the restart_bench section of this file")
    parser.add_argument("--load", help=argparse.SUPPRESS)  # internal: be the load process
    parser.add_argument("--events", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.load:
        asyncio.run(load(args.load, args.clients, args.max_new_tokens, args.events))
        return

    load_before = os.getloadavg()[0]
    workdir = tempfile.mkdtemp(prefix="restart-bench-")
    log_path, events_path = f"{workdir}/server.log", f"{workdir}/events.jsonl"
    Path(events_path).touch()
    rows = []

    def kill(case: str, events: Events | None, wait_for_standby: bool = True) -> None:
        if wait_for_standby:
            wait_until(lambda: standby_waits(proc.pid), "the standby has imported", every=0.2)
        rows.append({"case": case, **one_kill(url, proc.pid, log_path, events, len(rows))})
        print(summary_line(len(rows), rows[-1]), flush=True)

    with server(args.checkpoint, log_path) as (proc, url):
        kill("idle", None)
        events = Events(events_path)
        with load_process(url, args.clients, args.max_new_tokens, events_path):
            for _ in range(args.kills):
                start = time.monotonic()
                wait_until(lambda t=start: events.first_token_after(t) is not None, "streaming")
                time.sleep(args.settle)
                kill(f"{args.clients} clients", events)
            # the worst case: killed again as soon as it is back, its standby still importing
            kill(f"{args.clients} clients, at once again", events, wait_for_standby=False)
        statuses = {}
        for r in events.read():
            statuses[r[3]] = statuses.get(r[3], 0) + 1
    section = report(args, rows, statuses, load_before)
    print(section)
    if args.write:
        text = replace_marked(args.write.read_text(), section, START, END)
        if text is None:  # a new entry, newest first, under the history's heading when there is one
            text = args.write.read_text()
            entry = f"### {time.strftime('%Y-%m-%d')}: Engine restart under load\n\n{section}\n\n"
            head, found, rest = text.partition("\n### ")
            text = f"{head}\n{entry}### {rest}" if found else f"{text.rstrip()}\n\n{entry}"
        args.write.write_text(text)


def summary_line(k: int, row: dict) -> str:
    phases = " ".join(f"{n}={t:+.2f}" for n, t in row.get("phases", {}).items())
    token = f", first token after {row['token']:.2f} s" if "token" in row else ""
    return (
        f"kill {k} ({row['case']}): /ready 200 after {row['ready']:.2f} s{token}, load average "
        f"{row['load']:.1f}, machine CPU {row['cpu']:.0%}; {phases}"
    )


def report(args, rows, statuses, load_before) -> str:
    names = list(rows[0].get("phases", {}))
    head = ["kill", "case", "/ready 200 s", "first token s", "load avg", "machine CPU"]
    head += [f"{n} s" for n in names]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for k, row in enumerate(rows, 1):
        token = f"{row['token']:.2f}" if "token" in row else "-"
        cells = [str(k), row["case"], f"{row['ready']:.2f}", token, f"{row['load']:.1f}"]
        cells += [f"{row['cpu']:.0%}"] + [f"{row['phases'][n]:+.2f}" for n in names]
        lines.append("| " + " | ".join(cells) + " |")
    loaded = [r for r in rows[1:-1]]
    ready_s, token_s = [r["ready"] for r in loaded], [r["token"] for r in loaded]
    command = (
        f"`python bench/restart_bench.py --clients {args.clients} --kills {args.kills} "
        f"--max-new-tokens {args.max_new_tokens} --settle {args.settle:g}`"
    )
    counts = ", ".join(f"{n} {c}" for n, c in sorted(statuses.items()))
    return (
        f"{START}\nCommand: {command} ({time.strftime('%Y-%m-%d')}; server, engine process and "
        f"clients on the same {os.cpu_count()}-core machine, load average {load_before:.2f} "
        f"before the start).\n\n"
        f"With {args.clients} clients streaming, kill to /ready 200: median "
        f"{statistics.median(ready_s):.2f} s (max {max(ready_s):.2f} s); to the first token of a "
        f"request sent after the kill: median {statistics.median(token_s):.2f} s (max "
        f"{max(token_s):.2f} s). Phases are seconds from the kill (`launched`: when the process "
        f"that took over was started). The clients' answers over the run: {counts}.\n\n"
        + "\n".join(lines)
        + f"\n{END}"
    )


if __name__ == "__main__":
    main()
