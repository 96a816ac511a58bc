"""The training data cursor (`lib.training.state.DataCursor`, which the training loop draws its
batches from and saves in its state checkpoints): a seeded permutation per epoch and a position.

The order depends on the seed only; an epoch takes every block once (when the batch size divides
the block count; otherwise the incomplete tail batch of a permutation is dropped); and a restored
state (through torch.save/torch.load, as a checkpoint does) resumes exactly where it was."""

from __future__ import annotations

import io

import pytest
import torch

from lib.training.state import DataCursor


def draw(cursor: DataCursor, batch_size: int, steps: int) -> list[list[int]]:
    return [cursor.next_indices(batch_size).tolist() for _ in range(steps)]


def through_a_checkpoint(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save({"data": state}, buffer)
    buffer.seek(0)
    return torch.load(buffer, map_location="cpu", weights_only=False)["data"]


def test_the_same_seed_gives_the_same_order_whatever_the_global_rng():
    torch.manual_seed(1)
    a = draw(DataCursor.start(50, seed=7), 5, 40)  # 4 epochs
    torch.manual_seed(2)
    torch.rand(100)  # other users of torch's global generator change nothing
    b = draw(DataCursor.start(50, seed=7), 5, 40)
    assert a == b


def test_another_seed_gives_another_order():
    a = draw(DataCursor.start(50, seed=7), 5, 10)
    b = draw(DataCursor.start(50, seed=8), 5, 10)
    assert a != b
    assert sorted(sum(a, [])) == sorted(sum(b, [])) == list(range(50))  # the same blocks


def test_every_block_once_per_epoch_and_a_new_order_each_epoch():
    n, batch_size, epochs = 48, 6, 5
    cursor = DataCursor.start(n, seed=0)
    orders = []
    for epoch in range(epochs):
        seen = []
        for _ in range(n // batch_size):
            seen += cursor.next_indices(batch_size).tolist()
            assert cursor.epoch == epoch
        assert sorted(seen) == list(range(n)), f"epoch {epoch}"
        orders.append(seen)
    assert len({tuple(o) for o in orders}) == epochs  # reshuffled every epoch
    cursor.next_indices(batch_size)
    assert cursor.epoch == epochs and cursor.cursor == batch_size


def test_an_incomplete_tail_batch_is_dropped_and_no_block_repeats_within_an_epoch():
    n, batch_size = 10, 3  # 3 full batches per epoch, 1 block left over
    cursor = DataCursor.start(n, seed=3)
    for epoch in range(4):
        seen = []
        for _ in range(n // batch_size):
            seen += cursor.next_indices(batch_size).tolist()
            assert cursor.epoch == epoch
        assert seen == cursor.order.tolist()[: len(seen)]  # the epoch's permutation, in order
        assert len(seen) == len(set(seen)) == n - n % batch_size
        assert set(seen) <= set(range(n))


def test_a_batch_of_all_blocks_is_each_epoch_whole():
    cursor = DataCursor.start(8, seed=1)
    for epoch in range(3):
        assert sorted(cursor.next_indices(8).tolist()) == list(range(8))
        assert cursor.epoch == epoch


def test_a_batch_larger_than_the_data_is_refused():
    cursor = DataCursor.start(4, seed=0)
    with pytest.raises(ValueError, match="batch of 5 is larger than the 4 training blocks"):
        cursor.next_indices(5)


@pytest.mark.parametrize("saved_after", [0, 1, 3, 4, 5, 9, 12])  # 4 batches per epoch
def test_a_restored_state_resumes_exactly(saved_after):
    n, batch_size, seed = 20, 5, 11
    reference = draw(DataCursor.start(n, seed), batch_size, 20)

    first = DataCursor.start(n, seed)
    assert draw(first, batch_size, saved_after) == reference[:saved_after]
    position = (first.epoch, first.cursor)
    state = through_a_checkpoint(first.state_dict())
    after_save = draw(first, batch_size, 20 - saved_after)  # the first run goes on

    resumed = DataCursor.start(n, seed=999)  # a fresh process; the seed is in the state
    resumed.load_state_dict(state)
    assert (resumed.epoch, resumed.cursor) == position
    assert draw(resumed, batch_size, 20 - saved_after) == after_save == reference[saved_after:]


def test_a_state_is_a_snapshot_that_later_draws_do_not_change():
    cursor = DataCursor.start(12, seed=4)
    draw(cursor, 4, 2)
    state = cursor.state_dict()
    frozen = through_a_checkpoint(state)
    draw(cursor, 4, 5)  # into later epochs: new permutations, generator advanced
    assert state["cursor"] == frozen["cursor"] == 8 and state["epoch"] == 0
    assert torch.equal(state["order"], frozen["order"])
    assert torch.equal(state["generator"], frozen["generator"])


def test_a_state_from_other_data_is_refused():
    state = DataCursor.start(20, seed=0).state_dict()
    with pytest.raises(ValueError, match="made with 20 training blocks, the data now has 21"):
        DataCursor.start(21, seed=0).load_state_dict(state)
