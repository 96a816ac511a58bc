"""The engine process killed under a real server (serve.py, `ML_SERVICE_ENGINE=process`): the
stream it held ends with a clear error, the server's standby worker takes over, `/ready` comes
back, requests are answered, the restarts are counted, and twice in a row too (the second time
its standby may still be importing). How long that takes is bench/restart_bench.py's to measure:
the deadlines here only fail a hang."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import httpx
import pytest

from tests.helpers import CHECKPOINT, HANG_S, is_russian, metric, running_server, scrape, wait_for

pytestmark = pytest.mark.slow
WORKER = b"lib.inference.engine_process.worker"
LONG = {"text": "Москва", "max_new_tokens": 250, "min_new_tokens": 250, "stream": True}


def workers(server_pid: int) -> list[int]:
    """The server's live children that run the engine worker, oldest first (the engine process,
    then the standby launched after it)."""
    found = []
    for task in Path(f"/proc/{server_pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            try:
                cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
                stat = Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if WORKER in cmdline and stat[0] != "Z":
                found.append((int(stat[19]), int(child)))
    return [pid for _, pid in sorted(found)]


def gone(pid: int) -> bool:
    """Whether process `pid` has ended (a zombie, not reaped yet by whoever adopted it, has)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def ready(url: str) -> bool:
    return httpx.get(f"{url}/ready", timeout=HANG_S).status_code == 200


def kill_and_come_back(url: str, server_pid: int, restarts: int) -> None:
    """Kill the engine process while it streams; check what its client got, and that the
    standby took over and the server serves again."""
    wait_for(lambda: len(workers(server_pid)) == 2, "an engine process and a standby")
    engine, standby = workers(server_pid)
    events = []
    with httpx.stream("POST", f"{url}/forward", json=LONG, timeout=HANG_S) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("event: "):
                events.append([line.removeprefix("event: "), None])
                if events[-1][0] == "token" and len(events) == 3:
                    os.kill(engine, signal.SIGKILL)  # mid-stream
            elif line.startswith("data: ") and events:
                events[-1][1] = json.loads(line.removeprefix("data: "))
    kinds = [kind for kind, _ in events]
    assert kinds[-1] == "error" and "done" not in kinds, kinds  # never a silent truncation
    assert "retry" in events[-1][1]["detail"]
    wait_for(lambda: ready(url), "/ready is 200 again")
    now = workers(server_pid)
    assert now[0] == standby  # the standby is the engine process now
    wait_for(lambda: len(workers(server_pid)) == 2, "the next standby")
    assert engine not in workers(server_pid)
    answer = httpx.post(
        f"{url}/forward", json={"text": "Москва", "max_new_tokens": 8}, timeout=HANG_S
    )
    assert answer.status_code == 200 and is_russian(answer.json()["text"])
    text = scrape(url)
    assert metric(text, "ml_service_engine_restarts_total") == restarts
    assert metric(text, "ml_service_engine_up") == 1


def test_a_killed_engine_process_is_replaced_by_the_standby_twice_in_a_row():
    with running_server(["--checkpoint", str(CHECKPOINT)]) as proc:
        kill_and_come_back(proc.url, proc.pid, restarts=1)
        kill_and_come_back(proc.url, proc.pid, restarts=2)  # its standby may still import
        left = workers(proc.pid)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(HANG_S) == 0
    # the engine process and the standby end with the server
    wait_for(lambda: all(gone(pid) for pid in left), "the workers ended")


def test_the_workers_end_when_the_server_is_killed():
    """A server killed with SIGKILL cannot stop its workers: each sees its pipe close and ends."""
    with running_server(["--checkpoint", str(CHECKPOINT)]) as proc:
        wait_for(lambda: len(workers(proc.pid)) == 2, "an engine process and a standby")
        left = workers(proc.pid)
        proc.kill()
        proc.wait(HANG_S)
    wait_for(lambda: all(gone(pid) for pid in left), "the orphaned workers ended")
