"""How a model route's work runs, the same for `/forward`, `/forward_batch` and the OpenAI routes:
refuse at once when the queue has no room, prepare the request off the event loop (`off_loop`:
tokenizing, rendering a chat template), answer what the response cache holds, send the rest to
the loaded version's engine (cancelled when the client goes away, 504 past the timeout), note the
token counts for the access log, and pump a streamed answer as Server-Sent Events. Routes differ
only in their shapes: a stream's events are written by the route's `StreamFormat`."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import StreamingResponse

from ml_service.backend.errors import (
    ClientDisconnected,
    GenerationTimeout,
    Overloaded,
    ServiceError,
    as_service_error,
)
from ml_service.cache import CachedStream, StoringStream
from ml_service.hosting import Loaded
from ml_service.observability import ServiceMetrics

log = logging.getLogger("ml_service")
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no proxy buffering
T = TypeVar("T")
# One thread prepares every request of the process (a service's `preprocess`, /v1's tokenizing and
# chat templates): the event loop never does that work (64 prompts of 8,000 characters take a
# core 0.2-0.5 s to tokenize), and the tokenizer is never called from two threads at once (a
# `tokenizers` object holds its truncation and padding state, which a call may change, and a
# plugin's `preprocess` need not be thread-safe). What cannot fit is refused before tokenizing
# (`lib.inference.prompts.check_may_fit`), so this thread is never long busy with it.
_PREPARE = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prepare")


async def off_loop(fn: Callable[..., T], *args: Any) -> T:
    """`fn(*args)` in the preparing thread (with this task's context variables), awaited."""
    call = functools.partial(contextvars.copy_context().run, fn, *args)
    return await asyncio.get_running_loop().run_in_executor(_PREPARE, call)


def check_room(engine, n: int) -> None:
    """503 before any tokenization or model work when the queue cannot take `n` more."""
    if not engine.has_room(n):
        raise Overloaded([{"loc": ["queue"], "msg": "the request queue is full"}])


async def run_items(
    request: Request, deps, model: Loaded, items: list, opted_in: bool = True
) -> list:
    """Outputs for preprocessed `items`, in order: those the response cache holds from it, the
    others from the engine (together, one request to it), which are then stored; cancelled if the
    client goes away, 504 past the timeout."""
    plan = await deps.cache.plan(request, model.service, items, opted_in)
    fresh = []
    if todo := plan.missing():
        work = model.engine.submit_many([items[i] for i in todo])
        fresh = await unless_disconnected(request, work, deps.settings.request_timeout_s)
        await deps.cache.store(plan, model.service, fresh)
    outputs = plan.merged(fresh)
    note_usage(request, outputs)
    return outputs


async def stream_items(
    request: Request, deps, model: Loaded, items: list, opted_in: bool = True
) -> list:
    """One stream per item (the engine's `TokenStream` interface): a cached output as one piece,
    the others queued on the engine now (and stored when they finish)."""
    plan = await deps.cache.plan(request, model.service, items, opted_in)
    streams = []
    for item, key, found in zip(items, plan.keys, plan.found, strict=True):
        if found is not None:
            streams.append(CachedStream(found))
            continue
        stream = model.engine.stream(item)
        if key is not None and plan.write:
            stream = StoringStream(stream, deps.cache, key, model.service)
        streams.append(stream)
    return streams


def note_usage(request: Request, outputs: Sequence) -> None:
    """Token counts for the access log, when the outputs have them (text generation does)."""
    if outputs and all(hasattr(o, "completion_tokens") for o in outputs):
        request.state.prompt_tokens = sum(o.prompt_tokens for o in outputs)
        request.state.completion_tokens = sum(o.completion_tokens for o in outputs)


async def unless_disconnected(request: Request, work: Awaitable, timeout: float) -> Any:
    """Await `work`, cancelling it (and so its rows in the engine) if the client disconnects
    (499, nobody reads it) or it takes longer than `timeout` seconds (504)."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        done, _ = await asyncio.wait(
            {task, watcher}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
        )
    finally:
        watcher.cancel()
        task.cancel()  # a no-op once it is done; else its rows leave the engine
    if task in done:
        return task.result()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    if watcher in done:
        log.info("client disconnected from %s: its generation was cancelled", request.url.path)
        raise ClientDisconnected()
    raise GenerationTimeout([{"loc": ["timeout"], "msg": f"took longer than {timeout:g} s"}])


# -- streamed answers --------------------------------------------------------------------------
def sse(data: dict | str, event: str | None = None) -> str:
    """One Server-Sent Event: `data` as JSON (a string as it is), named `event` if given."""
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"event: {event}\ndata: {text}\n\n" if event else f"data: {text}\n\n"


class StreamFormat:
    """How one route writes a streamed answer: the SSE messages for each event of its streams
    (stream `i` is choice `i`). The pump (`sse_events`) decides everything else."""

    def piece(self, i: int, text: str) -> list[str]:
        """A piece of choice `i`'s text."""
        raise NotImplementedError

    def result(self, i: int, result) -> list[str]:
        """Choice `i` finished with `result` (its `GenerationResult`, or the service's output)."""
        raise NotImplementedError

    def finished(self, results: list) -> list[str]:
        """After every choice's result, in choice order (default: nothing more)."""
        return []

    def failed(self, error: ServiceError) -> list[str]:
        """The stream ends with `error` (what a JSON answer would have been)."""
        raise NotImplementedError


def stream_response(request: Request, deps, streams: list, fmt: StreamFormat) -> StreamingResponse:
    """The `text/event-stream` answer pumping `streams` (already queued: a full queue was a plain
    503) through `fmt`, within the request timeout."""
    body = sse_events(request, streams, fmt, deps.settings.request_timeout_s, deps.metrics)
    return StreamingResponse(body, media_type="text/event-stream", headers=SSE_HEADERS)


async def sse_events(
    request: Request,
    streams: list,
    fmt: StreamFormat,
    timeout: float,
    metrics: ServiceMetrics | None = None,
) -> AsyncIterator[str]:
    """The Server-Sent Events of one streamed answer (closing it cancels its streams).

    One timer for the whole answer (a timeout per event would cost a task per token); a failure
    (the timeout, the model, a shutdown) is mapped as a JSON answer's is and ends the answer with
    `fmt.failed`. Its status is 200 before any failure can happen, so a stream counts its own
    failures in `ml_service_request_failures_total` (the access log counts the others from their
    status); it is `cancelled` when the client goes away before every result is in."""
    expiry = asyncio.get_running_loop().call_later(
        timeout, lambda: [s.interrupt(TimeoutError()) for s in streams]
    )
    results: dict[int, Any] = {}
    failure = "cancelled"  # unless it ends otherwise: the client went away mid-stream
    try:
        async for i, event in merged(streams):
            if isinstance(event, BaseException):
                raise event
            if isinstance(event, str):
                for message in fmt.piece(i, event):
                    yield message
                continue
            results[i] = event
            if len(results) == len(streams):  # the work is done, whatever happens to the rest
                failure = None
                note_usage(request, [results[k] for k in sorted(results)])
            for message in fmt.result(i, event):
                yield message
        for message in fmt.finished([results[k] for k in sorted(results)]):
            yield message
    except Exception as e:  # the same map as JSON answers
        error = as_service_error(e)
        failure = error.reason
        if type(error) is ServiceError:  # not one we expected: a bug
            log.exception("stream failed")
        for message in fmt.failed(error):
            yield message
    finally:
        expiry.cancel()
        for s in streams:
            s.cancel()  # a no-op when it finished; otherwise its row leaves the batch
        if failure is not None and metrics is not None:
            metrics.failures.labels(reason=failure).inc()


async def merged(streams: list) -> AsyncIterator[tuple[int, object]]:
    """(stream index, event) from several streams, as they come; a stream's exception is an
    event (it ends that stream, the others go on)."""
    if len(streams) == 1:  # the usual case: no task and no queue hop per event
        async for event in streams[0]:
            yield 0, event
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, stream) -> None:
        try:
            async for event in stream:
                await queue.put((i, event))
        except BaseException as e:
            await queue.put((i, e))
        finally:
            await queue.put((i, None))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    left = len(streams)
    try:
        while left:
            i, event = await queue.get()
            if event is None:
                left -= 1
            else:
                yield i, event
    finally:
        for t in tasks:
            t.cancel()
        for s in streams:
            s.cancel()
