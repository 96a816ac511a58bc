"""DeepSpeed's start never waits without a deadline on a torch-extension build lock."""

from __future__ import annotations

import os
import threading
import time

import pytest
from torch.utils.file_baton import FileBaton

from lib.training.deepspeed import StaleBuildLock, bounded_build_waits


def test_a_lock_older_than_any_build_fails_at_once_naming_the_file(tmp_path):
    lock = tmp_path / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir()
    lock.touch()
    old = time.time() - 3600
    os.utime(lock, (old, old))
    start = time.monotonic()
    with bounded_build_waits(600), pytest.raises(StaleBuildLock) as error:
        FileBaton(str(lock)).wait()
    assert time.monotonic() - start < 1
    assert str(lock) in str(error.value) and f"rm {lock}" in str(error.value)


def test_a_fresh_lock_is_waited_on_until_the_deadline(tmp_path):
    lock = tmp_path / "lock"
    lock.touch()
    start = time.monotonic()
    with bounded_build_waits(0.5), pytest.raises(StaleBuildLock, match=str(lock)):
        FileBaton(str(lock)).wait()
    assert 0.3 < time.monotonic() - start < 5


def test_a_lock_released_by_its_build_ends_the_wait(tmp_path):
    lock = tmp_path / "lock"
    lock.touch()
    threading.Timer(0.3, lock.unlink).start()
    with bounded_build_waits(60):
        FileBaton(str(lock)).wait()
    assert not lock.exists()


def test_torchs_own_wait_is_restored_afterwards():
    original = FileBaton.wait
    with pytest.raises(ZeroDivisionError), bounded_build_waits():
        assert FileBaton.wait is not original
        raise ZeroDivisionError
    assert FileBaton.wait is original
