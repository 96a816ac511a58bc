"""Starting an engine process: `launch` runs the worker, `WorkerProcess.load` gives it its spec
and waits for its "ready".

The two steps are apart because the first is most of the time: a new interpreter spends seconds
importing torch and transformers (3 s on an idle 2-core machine, 6-12 s while 16 clients stream on
it: bench/restart_bench.py), against a quarter of a second to load the default model and warm up.
So the server keeps one worker launched ahead (`STANDBY`): it imports while the engine serves and
waits for a spec, and a restart after a crash only loads the model and warms up. A standby knows
no model until its spec comes, so one serves every engine process of the server (one per model
version loaded): whichever dies first takes it, and the next is launched at once.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Connection

from lib.inference.contract import EngineStartFailed
from lib.inference.registry import EngineSpec

WORKER = "lib.inference.engine_process.worker"

log = logging.getLogger(__name__)


class WorkerProcess:
    """A started `python -m lib.inference.engine_process.worker` and the front's ends of its
    pipes. A worker that has not had its spec yet is a standby: it has imported what it needs, or
    is importing it, and waits."""

    def __init__(self) -> None:
        requests_r, requests_w = os.pipe()
        events_r, events_w = os.pipe()
        # `-m` with the front's path, so nothing of the front's `__main__` is imported again
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        self.launched_at = time.monotonic()
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-m", WORKER, str(requests_r), str(events_w)],
                pass_fds=(requests_r, events_w),
                env=env,
            )
        finally:
            os.close(requests_r)  # the child's ends: closed here, so a dead child closes the pipe
            os.close(events_w)
        self.send_end = Connection(requests_w, readable=False)
        self.receive_end = Connection(events_r, writable=False)

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def returncode(self) -> int | None:
        return self.process.returncode

    def exited(self) -> bool:
        return self.process.poll() is not None

    def load(self, spec: EngineSpec, timeout_s: float) -> dict[str, float]:
        """Send `spec` and wait until the worker has loaded and warmed up its model; the times
        (`time.monotonic()`) of its start's steps. EngineStartFailed (the worker is ended) when
        it cannot load, exits, or takes longer than `timeout_s`."""
        try:
            self.send_end.send(spec)
            deadline = time.monotonic() + timeout_s
            while not self.receive_end.poll(0.2):
                if self.exited():
                    raise EngineStartFailed(
                        f"the engine process exited with code {self.process.returncode} while "
                        "loading"
                    )
                if time.monotonic() > deadline:
                    raise EngineStartFailed(
                        f"the engine process was not ready within {timeout_s:.0f} s"
                    )
            message = self.receive_end.recv()
        except (EOFError, OSError):
            message = ("failed", "its pipe closed")
        except BaseException:
            self.end(0)
            raise
        if message[0] != "ready":
            self.end(5)
            raise EngineStartFailed(f"the engine process could not load its model ({message[1]})")
        return {"launched": self.launched_at, **message[2], "ready": time.monotonic()}

    def end(self, timeout: float) -> bool:
        """Close the pipes (a worker that waits for its spec, or serves, then exits by itself),
        wait up to `timeout` for it to exit, else kill it; whether it exited by itself."""
        self.send_end.close()
        self.receive_end.close()
        return end_process(self.process, timeout)


class Standby:
    """The worker launched ahead for whichever engine process of this server dies first, kept
    while at least one engine that wants it is up (`hold`/`release`)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._worker: WorkerProcess | None = None
        self._holders = 0

    @property
    def pid(self) -> int | None:
        worker = self._worker
        return None if worker is None else worker.pid

    def hold(self) -> None:
        """An engine process is up: have a standby for it."""
        with self._lock:
            self._holders += 1
        self.refill()

    def release(self) -> None:
        """An engine process has stopped: the standby ends with the last one."""
        with self._lock:
            self._holders = max(0, self._holders - 1)
            worker = None
            if self._holders == 0:
                worker, self._worker = self._worker, None
        if worker is not None:
            worker.end(0)  # it holds nothing: killed at once

    def refill(self) -> None:
        """Launch a standby if there is none and an engine is up."""
        with self._lock:
            if self._worker is not None or self._holders == 0:
                return
        try:
            worker = WorkerProcess()
        except OSError as e:  # none to spare now: a restart launches its own
            log.warning("no standby engine process: %s", e)
            return
        with self._lock:
            if self._worker is None and self._holders > 0:
                self._worker, worker = worker, None
        if worker is not None:  # another thread launched one meanwhile, or every engine stopped
            worker.end(0)

    def take(self) -> WorkerProcess:
        """The standby (the caller owns it now), or a new worker where there is none left."""
        with self._lock:
            worker, self._worker = self._worker, None
        if worker is not None and not worker.exited():
            return worker
        if worker is not None:
            log.warning("the standby engine process had exited (code %s)", worker.returncode)
            worker.end(0)
        return WorkerProcess()


STANDBY = Standby()  # this server's: every `EngineProcess` uses it unless given another


def end_process(process: subprocess.Popen, timeout: float) -> bool:
    """Wait up to `timeout` for `process` to exit, else kill it; whether it exited by itself."""
    try:
        process.wait(timeout)
        return True
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        return False
