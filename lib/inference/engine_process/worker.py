"""The engine process: load the model its spec names, warm up, say ready, then run the
continuous-batching engine (`engine.py`) for the front (`client.py`) until told to stop or the
front goes away. Started as `python -m lib.inference.engine_process.worker IN_FD OUT_FD`
(launch.py), possibly well before its spec comes: a standby imports first, then waits."""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from multiprocessing.connection import Connection

import torch

from lib.inference.contract import EngineStopped
from lib.inference.engine import GenerationEngine
from lib.inference.engine_process.protocol import DONE, TEXT, ChannelOutbox, ShippingObserver
from lib.inference.registry import EngineSpec
from lib.inference.rows import GenerationRequest
from lib.inference.service import InferenceService
from lib.inference.types import GenerationParams

IMPORTED_AT = time.monotonic()  # the heavy imports above are most of a cold start
log = logging.getLogger(__name__)


ENGINE_CALLS = ("add_adapter", "remove_adapter", "list_adapters")  # ("call" messages)


def load_engine_service(spec: EngineSpec) -> InferenceService:
    """The model as the engine process serves it (loaded with one thread: engine.py explains)."""
    torch.set_num_threads(1)
    return InferenceService.from_spec(spec.load)


def engine_main(inbox: Connection, outbox: Connection) -> None:
    """The engine process: read its spec, load, warm up, say ready, then serve the front."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the front, which stops us
    try:
        spec: EngineSpec = inbox.recv()  # at once, or, for a standby, when the engine dies
    except (EOFError, OSError):  # a standby no longer needed, or its front went away
        return
    phases = {"imported": IMPORTED_AT, "spec": time.monotonic()}
    logging.basicConfig(
        level=logging.INFO, format=f"%(asctime)s engine[{os.getpid()}] %(levelname)s %(message)s"
    )
    try:
        service = load_engine_service(spec)
        phases["loaded"] = time.monotonic()
        if spec.warmup:
            service.generate("Привет", GenerationParams(max_new_tokens=2, temperature=0))
        phases["warmed"] = time.monotonic()
    except Exception as e:
        log.exception("the engine process could not load its model")
        outbox.send(("failed", type(e).__name__))
        return
    out = ChannelOutbox(outbox)
    engine = GenerationEngine(
        service.model,
        service.tokenizer,
        max_batch_size=spec.max_batch_size,
        max_wait_s=spec.max_wait_s,
        max_queue=1 << 30,  # the front decides what is queued
        lock=service._lock,
        observer=ShippingObserver(out),
        threads=spec.threads,
        outbox=out,
        prefix_cache_mb=spec.prefix_cache_mb,
        adapters=spec.adapters,
        adapter_mb=spec.adapter_mb,
        base_sha256=service.checkpoint_sha256,
    )
    out.running = lambda: engine.running
    engine.start()
    outbox.send(("ready", os.getpid(), phases))
    requests: dict[int, GenerationRequest] = {}

    def finisher(rid: int) -> Callable:
        def done(outcome) -> None:
            requests.pop(rid, None)
            out.add((DONE, rid, outcome))

        return done

    while True:
        try:
            message = inbox.recv()
        except (EOFError, OSError):  # the front went away
            engine.abort(EngineStopped("the front process went away"))
            return
        kind = message[0]
        if kind == "add":
            batch = []
            for rid, ids, params, arrived_at, streamed in message[1]:
                on_text = (lambda piece, rid=rid: out.add((TEXT, rid, piece))) if streamed else None
                r = GenerationRequest(
                    ids, params, on_text=on_text, on_done=finisher(rid), arrived_at=arrived_at
                )
                requests[rid] = r
                batch.append(r)
            try:
                engine.enqueue(batch)
            except EngineStopped as e:
                for r in batch:
                    r.finish(e)
                out.flush()
        elif kind == "cancel":
            for rid in message[1]:
                if (r := requests.get(rid)) is not None:
                    r.cancel()
            engine.discard_cancelled()  # queued ones answer now: the front frees their places
        elif kind == "call":
            _, rid, name, args = message
            try:  # the adapters are the engine's; the rest the model's
                target = engine if name in ENGINE_CALLS else service
                outcome = getattr(target, name)(*args)
            except Exception as e:
                outcome = e
            out.add((DONE, rid, outcome))
            out.flush()
        elif kind == "abort":
            engine.abort(message[1])
        elif kind == "stop":
            engine.stop(message[1])
            out.flush()
            return


if __name__ == "__main__":  # the engine process (EngineProcess._spawn)
    engine_main(
        Connection(int(sys.argv[1]), writable=False), Connection(int(sys.argv[2]), readable=False)
    )
