"""`lib.inference.micro_batch.MicroBatcher` on its own: which items `predict` sees together, and what each
caller gets back. Batches are made deterministic with a gate: `predict` blocks on its first batch
until the test has queued what it wants, so the next batches are taken from a known queue. No
assertion depends on how fast anything runs; timeouts only fail a test that hangs."""

from __future__ import annotations

import asyncio
import threading

import pytest

from lib.inference import EngineStopped, QueueFull
from lib.inference.micro_batch import MicroBatcher, PredictionFailed
from tests.helpers import until

HANG = 60.0  # seconds: only a hang gets near this


class Model:
    """A `predict` that records every batch; while `gate` is closed, the batch holding
    `blocker` waits inside `predict` (so the worker is busy and the queue fills)."""

    def __init__(self, blocker=None, fail_on=None):
        self.batches: list[list] = []
        self.blocker = blocker
        self.fail_on = fail_on
        self.entered = threading.Event()  # the blocker's batch is inside predict
        self.gate = threading.Event()

    def __call__(self, items: list) -> list:
        self.batches.append(list(items))
        if self.blocker is not None and self.blocker in items:
            self.entered.set()
            assert self.gate.wait(HANG), "the gate was never opened"
        if self.fail_on is not None and self.fail_on in items:
            raise ValueError(f"cannot predict {self.fail_on!r}")
        return [f"out:{x}" for x in items]


class Steps:
    """An observer: `on_step(batch_size, seconds)` once per batch."""

    def __init__(self):
        self.sizes: list[int] = []

    def on_step(self, batch_size: int, seconds: float) -> None:
        self.sizes.append(batch_size)


@pytest.fixture
def started():
    """Start batchers; every one is stopped (and its gate opened) at the end."""
    made: list[tuple[MicroBatcher, Model]] = []

    def start(model: Model, **kwargs) -> MicroBatcher:
        batcher = MicroBatcher(model, **kwargs)
        batcher.start()
        made.append((batcher, model))
        return batcher

    yield start
    for batcher, model in made:
        model.gate.set()
        batcher.stop(HANG)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, HANG))


async def blocked(batcher: MicroBatcher, model: Model) -> asyncio.Task:
    """Submit the blocker and wait until its batch is inside predict; returns its task."""
    task = asyncio.create_task(batcher.submit(model.blocker))
    await until(model.entered.is_set, "the blocker's batch reached predict")
    return task


def test_results_come_back_in_order_for_each_caller(started):
    model = Model()
    batcher = started(model, max_batch_size=4, max_wait_s=0.0, max_queue=100)

    async def scenario():
        many = batcher.submit_many(list(range(10)))
        one = batcher.submit("x")
        return await asyncio.gather(many, one)

    many, one = run(scenario())
    assert many == [f"out:{i}" for i in range(10)]
    assert one == "out:x"
    seen = [x for batch in model.batches for x in batch]
    assert sorted(seen, key=str) == sorted([*range(10), "x"], key=str)  # each item once


def test_batches_hold_at_most_max_batch_size_items_taken_from_the_queue_in_order(started):
    model, steps = Model(blocker="b"), Steps()
    batcher = started(model, max_batch_size=4, max_wait_s=0.0, max_queue=100, observer=steps)

    async def scenario():
        first = await blocked(batcher, model)
        rest = asyncio.create_task(batcher.submit_many(list(range(10))))
        await until(lambda: batcher.waiting == 10, "10 items queued")
        assert batcher.running == 1  # the blocker's batch
        model.gate.set()
        return await first, await rest

    first, rest = run(scenario())
    assert first == "out:b" and rest == [f"out:{i}" for i in range(10)]
    # the 10 were all queued when the worker came back: full batches, then the remainder
    assert model.batches == [["b"], [0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert steps.sizes == [1, 4, 4, 2]
    assert batcher.running == 0 and batcher.waiting == 0


def test_max_wait_groups_requests_that_arrive_while_the_first_one_waits(started):
    """With a long max_wait_s, items submitted one by one (each after the worker took the one
    before) still form one batch: predict is called once, as soon as the batch is full."""
    model = Model()
    batcher = started(model, max_batch_size=3, max_wait_s=HANG, max_queue=100)

    async def scenario():
        tasks = []
        for item in ("a", "b"):
            tasks.append(asyncio.create_task(batcher.submit(item)))
            await until(lambda: batcher.waiting == 0, f"the worker took {item!r}")
            assert model.batches == []  # waiting for company, not predicting yet
        tasks.append(asyncio.create_task(batcher.submit("c")))  # the batch is full
        return await asyncio.gather(*tasks)

    assert run(scenario()) == ["out:a", "out:b", "out:c"]
    assert model.batches == [["a", "b", "c"]]


def test_without_max_wait_a_lone_request_is_predicted_alone(started):
    """max_wait_s=0: nobody waits for company; each request submitted after the previous one was
    answered is a batch of its own (counted in calls, not timed)."""
    model = Model()
    batcher = started(model, max_batch_size=8, max_wait_s=0.0, max_queue=100)

    async def scenario():
        return [await batcher.submit(item) for item in ("a", "b", "c")]

    assert run(scenario()) == ["out:a", "out:b", "out:c"]
    assert model.batches == [["a"], ["b"], ["c"]]


def test_a_full_queue_refuses_with_queue_full_and_takes_requests_again_once_drained(started):
    model = Model(blocker="b")
    batcher = started(model, max_batch_size=1, max_wait_s=0.0, max_queue=2)

    async def scenario():
        first = await blocked(batcher, model)
        queued = [asyncio.create_task(batcher.submit(i)) for i in (1, 2)]
        await until(lambda: batcher.waiting == 2, "2 items queued")
        assert not batcher.has_room() and batcher.has_room(0)
        with pytest.raises(QueueFull, match="the limit is 2"):
            await batcher.submit(3)
        with pytest.raises(QueueFull):
            await batcher.submit_many([4, 5])  # all or none
        assert batcher.waiting == 2  # the refused ones were not queued
        model.gate.set()
        answers = [await first, *[await t for t in queued]]
        assert batcher.has_room(2)
        return answers, await batcher.submit(6)

    answers, after = run(scenario())
    assert answers == ["out:b", "out:1", "out:2"] and after == "out:6"
    assert [x for batch in model.batches for x in batch] == ["b", 1, 2, 6]


def test_a_failing_predict_fails_its_own_batch_only(started):
    model = Model(blocker="b", fail_on="bad")
    batcher = started(model, max_batch_size=2, max_wait_s=0.0, max_queue=100)

    async def scenario():
        first = await blocked(batcher, model)
        # queued as two batches of two: ["bad", "x"] then ["y", "z"]
        tasks = [asyncio.create_task(batcher.submit(i)) for i in ("bad", "x", "y", "z")]
        await until(lambda: batcher.waiting == 4, "4 items queued")
        model.gate.set()
        outcomes = await asyncio.gather(first, *tasks, return_exceptions=True)
        return outcomes, await batcher.submit("later")  # the worker lives on

    (first, bad, x, y, z), later = run(scenario())
    assert model.batches == [["b"], ["bad", "x"], ["y", "z"], ["later"]]
    assert first == "out:b"
    for outcome in (bad, x):  # the batch with the failing item: both callers get the error
        assert isinstance(outcome, PredictionFailed), outcome
        assert "cannot predict 'bad'" in str(outcome)
    assert (y, z, later) == ("out:y", "out:z", "out:later")


def test_a_predict_that_returns_the_wrong_number_of_outputs_fails_that_batch():
    calls = []

    def short_predict(items):
        calls.append(list(items))
        return ["only one"] if "a" in items else [f"out:{x}" for x in items]

    # batches of 2 with a long max_wait_s: each submit_many of 2 is one batch, predicted at once
    batcher = MicroBatcher(short_predict, max_batch_size=2, max_wait_s=HANG, max_queue=10)
    batcher.start()
    try:
        with pytest.raises(PredictionFailed, match="1 outputs for 2 inputs"):
            run(batcher.submit_many(["a", "b"]))
        assert run(batcher.submit_many(["c", "d"])) == ["out:c", "out:d"]
    finally:
        batcher.stop(HANG)
    assert calls == [["a", "b"], ["c", "d"]]


def test_cancelled_requests_are_skipped(started):
    model, steps = Model(blocker="b"), Steps()
    batcher = started(model, max_batch_size=8, max_wait_s=0.0, max_queue=100, observer=steps)

    async def scenario():
        first = await blocked(batcher, model)
        gone = asyncio.create_task(batcher.submit_many(["gone-1", "gone-2"]))
        kept = asyncio.create_task(batcher.submit("kept"))
        await until(lambda: batcher.waiting == 3, "3 items queued")
        gone.cancel()  # the caller went away: its queued items are cancelled
        with pytest.raises(asyncio.CancelledError):
            await gone
        model.gate.set()
        return await first, await kept

    assert run(scenario()) == ("out:b", "out:kept")
    assert model.batches == [["b"], ["kept"]]  # predict never saw the cancelled items
    assert steps.sizes == [1, 1]


def test_a_batch_of_cancelled_requests_only_does_not_call_predict(started):
    model, steps = Model(blocker="b"), Steps()
    batcher = started(model, max_batch_size=1, max_wait_s=0.0, max_queue=100, observer=steps)

    async def scenario():
        first = await blocked(batcher, model)
        gone = asyncio.create_task(batcher.submit("gone"))
        await until(lambda: batcher.waiting == 1, "1 item queued")
        gone.cancel()
        with pytest.raises(asyncio.CancelledError):
            await gone
        model.gate.set()
        await first
        return await batcher.submit("next")

    assert run(scenario()) == "out:next"
    assert model.batches == [["b"], ["next"]] and steps.sizes == [1, 1]


def test_stop_finishes_the_queued_work_then_ends_the_worker(started):
    model = Model(blocker="b")
    batcher = started(model, max_batch_size=2, max_wait_s=0.0, max_queue=100)

    async def scenario():
        first = await blocked(batcher, model)
        queued = [asyncio.create_task(batcher.submit(i)) for i in range(5)]
        await until(lambda: batcher.waiting == 5, "5 items queued")
        stopping = asyncio.create_task(asyncio.to_thread(batcher.stop, HANG))
        # stop() queues its end marker behind the work, and waits for the worker
        await until(lambda: batcher.waiting == 6, "the end marker queued")
        assert not stopping.done()
        model.gate.set()
        await stopping
        answers = [await first, *[await t for t in queued]]
        with pytest.raises(EngineStopped):
            await batcher.submit("after")
        return answers

    assert run(scenario()) == ["out:b", *[f"out:{i}" for i in range(5)]]
    assert [x for batch in model.batches for x in batch] == ["b", 0, 1, 2, 3, 4]


def test_abort_ends_the_running_batch_and_the_queue_with_the_error(started):
    model = Model(blocker="b")
    batcher = started(model, max_batch_size=1, max_wait_s=0.0, max_queue=100)
    error = EngineStopped("the service is shutting down")

    async def scenario():
        first = await blocked(batcher, model)
        queued = [asyncio.create_task(batcher.submit(i)) for i in (1, 2)]
        await until(lambda: batcher.waiting == 2, "2 items queued")
        await asyncio.to_thread(batcher.abort, error)
        outcomes = await asyncio.gather(first, *queued, return_exceptions=True)
        with pytest.raises(EngineStopped):
            await batcher.submit("after")
        model.gate.set()  # predict returns; its outputs are dropped
        return outcomes

    assert run(scenario()) == [error, error, error]
    assert model.batches == [["b"]]  # the queued items never reached predict
