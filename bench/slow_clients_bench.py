#!/usr/bin/env python
"""Connections that never finish a request: how many file descriptors a real server holds while
idle sockets (no byte sent), partial-header clients (a header byte per second) and slow-body
clients (a body byte per second) stay connected, and how many of them it has closed.

The server is `python -m ml_service.runner text-generation` on the embedded checkpoint, run from
`--repo` (default: this checkout; give another checkout, e.g. a `git worktree` of an older commit,
to measure before and after), with ML_SERVICE_REQUEST_READ_TIMEOUT_S / KEEP_ALIVE_TIMEOUT_S from
the options. The file descriptors are counted in /proc/PID/fd of the server's process (Linux).

    python bench/slow_clients_bench.py --idle 200 --partial 25 --slow-body 25 --hold 12 \
        --read-timeout 4
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(
    repo: Path, port: int, read_timeout: float, keep_alive: int, log
) -> subprocess.Popen:
    env = {
        **os.environ,
        "ML_SERVICE_LOG_LEVEL": "warning",
        "ML_SERVICE_REQUEST_READ_TIMEOUT_S": str(read_timeout),
        "ML_SERVICE_KEEP_ALIVE_TIMEOUT_S": str(keep_alive),
    }
    cmd = [sys.executable, "-m", "ml_service.runner", "text-generation", "--port", str(port)]
    proc = subprocess.Popen(cmd, cwd=repo, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited early: see {log.name}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("the server did not become ready within 120 s")


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def closed_by_server(sock: socket.socket) -> bool:
    try:
        return sock.recv(4096, socket.MSG_DONTWAIT | socket.MSG_PEEK) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repo", type=Path, default=ROOT, help="the checkout whose server runs")
    p.add_argument("--idle", type=int, default=200, help="sockets that send nothing")
    p.add_argument("--partial", type=int, default=25, help="clients that dribble their headers")
    p.add_argument("--slow-body", type=int, default=25, help="clients that dribble their body")
    p.add_argument("--hold", type=float, default=12.0, help="seconds to keep them going")
    p.add_argument("--read-timeout", type=float, default=4.0, help="request_read_timeout_s")
    p.add_argument("--keep-alive", type=int, default=2, help="keep_alive_timeout_s")
    args = p.parse_args()

    port = free_port()
    log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
    proc = start_server(args.repo, port, args.read_timeout, args.keep_alive, log)
    try:
        base = fds(proc.pid)
        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(args.idle)]
        partial = [socket.create_connection(("127.0.0.1", port)) for _ in range(args.partial)]
        slow = [socket.create_connection(("127.0.0.1", port)) for _ in range(args.slow_body)]
        for s in partial:
            s.sendall(b"POST /forward HTTP/1.1\r\nHost: bench\r\n")
        head = b"POST /forward HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
        for s in slow:
            s.sendall(head + b"Content-Length: 1000\r\n\r\n{")
        start = time.monotonic()
        samples = []
        while (elapsed := time.monotonic() - start) < args.hold:
            for s in partial:
                if not closed_by_server(s):
                    s.send(b"x")
            for s in slow:
                if not closed_by_server(s):
                    s.send(b" ")
            samples.append((round(elapsed, 1), fds(proc.pid)))
            time.sleep(1.0)
        groups = {"idle": idle, "partial": partial, "slow_body": slow}
        closed = {name: sum(closed_by_server(s) for s in socks) for name, socks in groups.items()}
        ok = httpx.get(f"http://127.0.0.1:{port}/health", timeout=10).status_code
        result = {
            "repo": str(args.repo),
            "read_timeout_s": args.read_timeout,
            "keep_alive_s": args.keep_alive,
            "hold_s": args.hold,
            "clients": {name: len(socks) for name, socks in groups.items()},
            "server_fds_before": base,
            "server_fds_peak": max(n for _, n in samples),
            "server_fds_at_end": fds(proc.pid),
            "closed_by_server_at_end": closed,
            "health_after": ok,
            "fds_over_time": samples,
        }
        print(json.dumps(result, indent=1))
        for s in idle + partial + slow:
            s.close()
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        log.close()
        Path(log.name).unlink(missing_ok=True)


if __name__ == "__main__":
    main()
