"""The shared I/O pool (transfer/pool.py): reuse, rebuild, fork, and no work left running."""

from __future__ import annotations

import errno
import os
import threading
import time

import numpy as np
import pytest
import torch

import torchkeep
from torchkeep import knobs
from torchkeep.storage.io import FileOps, use_ops
from torchkeep.transfer import pool
from torchkeep.transfer.pool import drain, io_pool, parallel_copy


def test_one_pool_is_reused_and_rebuilt_when_the_knob_changes(monkeypatch):
    monkeypatch.setattr(knobs, "IO_THREADS", 3)
    first = io_pool()
    assert io_pool() is first
    monkeypatch.setattr(knobs, "IO_THREADS", 2)
    second = io_pool()
    assert second is not first and second._max_workers == 2
    assert second.submit(lambda: 41 + 1).result(timeout=10) == 42


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_gets_working_threads():
    """The child inherits the pool object but not its threads: it must build a new pool,
    or its first save would wait for ever."""
    assert io_pool().submit(lambda: 1).result(timeout=10) == 1  # the parent's pool has threads
    pid = os.fork()
    if pid == 0:  # child: exit 0 only if the pool runs work
        try:
            ok = io_pool().submit(lambda: 7).result(timeout=10) == 7
            os._exit(0 if ok else 1)
        except BaseException:
            os._exit(2)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_drain_cancels_queued_work_and_waits_for_running_work(monkeypatch):
    monkeypatch.setattr(knobs, "IO_THREADS", 1)
    pool = io_pool()
    started, finished = threading.Event(), threading.Event()

    def slow() -> None:
        started.set()
        time.sleep(0.2)
        finished.set()

    running = pool.submit(slow)
    queued = pool.submit(lambda: None)
    assert started.wait(10)
    drain([running, queued])
    assert finished.is_set()  # drain returned only after the running task ended
    assert queued.cancelled()


class SlowFailingOps(FileOps):
    """Slow writes on several threads; the fourth write fails. Counts writes in progress."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.calls = 0
        self.active = 0

    def pwrite(self, fd: int, data: memoryview, offset: int) -> int:
        with self.lock:
            self.calls += 1
            call = self.calls
            self.active += 1
        try:
            time.sleep(0.05)
            if call == 4:
                raise OSError(errno.EIO, "injected EIO")
            return super().pwrite(fd, data, offset)
        finally:
            with self.lock:
                self.active -= 1


@pytest.mark.parametrize("direct", [False, True])
def test_a_failed_save_leaves_no_write_running(direct, monkeypatch, tmp_path):
    """When a save raises, none of its writes may still be in flight: the temporary's
    descriptor is closed next, and its number may be reused by another file."""
    monkeypatch.setattr(knobs, "IO_THREADS", 4)
    monkeypatch.setattr(knobs, "CHUNK_BYTES", 64 * 1024)
    monkeypatch.setattr(knobs, "DIRECT_CHUNK_BYTES", 64 * 1024)
    monkeypatch.setattr(knobs, "DIRECT_MIN_BYTES", 1 if direct else 1 << 62)
    ops = SlowFailingOps()
    obj = {"w": torch.randn(400_000)}  # 1.6 MB: 25 writes of 64 KiB
    with use_ops(ops), pytest.raises(torchkeep.StorageError, match="I/O error"):
        torchkeep.save(obj, str(tmp_path / "x.tk"))
    assert ops.active == 0
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("piece", [1, 7, 4096, 1 << 20])
def test_parallel_copy_copies_every_byte_at_any_piece_size(monkeypatch, piece):
    monkeypatch.setattr(knobs, "IO_THREADS", 3)
    rng = np.random.default_rng(piece)
    sizes = [0, 1, 4095, 20_000, 100_003]
    srcs = [rng.integers(0, 256, n, dtype=np.uint8) for n in sizes]
    dsts = [np.zeros(n, dtype=np.uint8) for n in sizes]
    parallel_copy(list(zip(dsts, srcs)), piece)
    assert all(np.array_equal(d, s) for d, s in zip(dsts, srcs))
    parallel_copy([], piece)  # nothing to copy: returns at once


def test_parallel_copy_uses_the_pool_and_the_caller(monkeypatch):
    monkeypatch.setattr(knobs, "IO_THREADS", 2)
    seen = set()
    real = pool.copy_bytes

    def spy(dst, src):
        seen.add(threading.current_thread().name.split("_")[0])
        time.sleep(0.002)  # long enough that every thread gets a piece
        real(dst, src)

    monkeypatch.setattr(pool, "copy_bytes", spy)
    src = np.arange(64, dtype=np.uint8)
    dst = np.zeros(64, dtype=np.uint8)
    parallel_copy([(dst, src)], 1)
    assert np.array_equal(dst, src)
    assert seen == {"MainThread", "torchkeep-io"}


def test_parallel_copy_error_stops_every_helper_before_it_is_raised(monkeypatch):
    """A failing piece (in a helper or in the caller) is re-raised, the other threads stop
    taking pieces, and none still writes into the staging buffer once the caller is told."""
    monkeypatch.setattr(knobs, "IO_THREADS", 3)
    real = pool.copy_bytes
    copied = []

    def flaky(dst, src):
        if len(copied) == 5:
            raise MemoryError("simulated")
        time.sleep(0.001)
        real(dst, src)
        copied.append(1)

    monkeypatch.setattr(pool, "copy_bytes", flaky)
    dst = np.zeros(1000, dtype=np.uint8)
    with pytest.raises(MemoryError, match="simulated"):
        parallel_copy([(dst, np.ones(1000, dtype=np.uint8))], 1)
    done = len(copied)
    time.sleep(0.05)
    assert len(copied) == done < 100  # the others stopped too, instead of copying all 1,000


def test_after_exit_began_the_pool_runs_tasks_inline(monkeypatch):
    """Once interpreter exit has begun concurrent.futures refuses new work; io_pool then hands
    out an executor that runs each task in the caller (errors kept in the future)."""
    monkeypatch.setattr(pool, "_exiting", True)
    executor = io_pool()
    assert isinstance(executor, pool.InlineExecutor)
    assert executor.submit(threading.current_thread).result() is threading.current_thread()
    failed = executor.submit(int, "x")
    assert failed.done() and isinstance(failed.exception(), ValueError)
    dst = np.zeros(10_000, dtype=np.uint8)
    parallel_copy([(dst, np.full(10_000, 7, dtype=np.uint8))], 100)
    assert (dst == 7).all()
