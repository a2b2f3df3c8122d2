"""The process's I/O thread pool, shared by every read and write.

Starting threads is not free: on a 2-vCPU VM a profile of repeated small loads showed ~0.9 ms
per thread start. One pool of ``IO_THREADS`` workers is created on first use and kept; it is
rebuilt when the knob changes and after ``fork`` (the child inherits the pool object but not
its threads).

Callers must not leave work running when they return: :func:`drain` cancels what has not
started and waits for what has, so no worker writes to a closed descriptor or into a tensor
after an error was raised. :class:`Pipeline` is the writers' way in: bounded look-ahead,
errors re-raised in order, and a drain on abandon. :func:`parallel_copy` is the async
snapshot's: many memory copies shared out in pieces (:func:`parallel_copy_hash` also checksums
each copy).
"""

from __future__ import annotations

import functools
import os
import threading
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor, wait
from typing import Any

import numpy as np

from .. import knobs
from .memcopy import copy_and_hash, copy_bytes

_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None
_size = 0
_exiting = False  # interpreter exit has begun: see _mark_exiting


class InlineExecutor(Executor):
    """Runs each task in the calling thread at once and returns its finished future."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        future: Future = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as exc:  # handed to whoever looks at the future
            future.set_exception(exc)
        return future


_INLINE = InlineExecutor()


def io_pool() -> Executor:
    """The shared pool, sized by ``knobs.IO_THREADS`` as it is now; once interpreter exit has
    begun, an executor that runs tasks inline (see ``_mark_exiting``)."""
    global _pool, _size
    if _exiting:
        return _INLINE
    size = max(1, knobs.IO_THREADS)
    with _lock:
        if _pool is None or _size != size:
            if _pool is not None:
                _pool.shutdown(wait=False)  # queued work still runs; new work goes to the new pool
            _pool = ThreadPoolExecutor(max_workers=size, thread_name_prefix="torchkeep-io")
            _size = size
        return _pool


def drain(futures: Iterable[Future]) -> None:
    """Cancel the futures that have not started and wait for the ones that have."""
    futures = list(futures)
    for future in futures:
        future.cancel()
    wait(futures)


class Pipeline:
    """Tasks handed to the shared pool with at most ``limit`` in flight.

    ``submit`` first waits for the oldest tasks once ``limit`` are pending, and a worker's
    error is re-raised there or by ``wait``; ``abandon`` (after an error) drains the rest.
    """

    def __init__(self, limit: int) -> None:
        self.pool = io_pool()
        self.limit = max(1, limit)
        self.pending: deque[Future] = deque()

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        while len(self.pending) >= self.limit:
            self.pending.popleft().result()
        self.pending.append(self.pool.submit(fn, *args))

    def wait(self) -> None:
        """Wait for every task; re-raises the first error."""
        while self.pending:
            self.pending.popleft().result()

    def abandon(self) -> None:
        drain(self.pending)


def parallel_copy(pairs: Iterable[tuple[np.ndarray, np.ndarray]], piece: int) -> None:
    """Copy each ``(dst, src)`` pair of flat byte arrays, in pieces of ``piece`` bytes.

    The pool's workers and the calling thread take pieces from one shared list until it is
    empty (``memcopy.copy_bytes``: streaming stores where available; it releases the GIL).
    Work shared this way finishes as soon as the machine's cores together are done; a static
    split (``Tensor.copy_`` hands each of torch's threads a fixed half) waits for the slowest
    thread, which on a busy machine (data-loader workers, a noisy VM neighbour) is the one that
    lost its core.
    """
    step = max(1, piece)
    tasks = [
        functools.partial(copy_bytes, dst[lo : lo + step], src[lo : lo + step])
        for dst, src in pairs
        for lo in range(0, src.nbytes, step)
    ]
    share_out(tasks)


def parallel_copy_hash(pairs: list[tuple[np.ndarray, np.ndarray]]) -> list[str]:
    """Copy each ``(dst, src)`` pair and return the checksum of each copy, in order.

    A checksum is one sequential pass, so the pairs (not pieces of them) are shared out, the
    largest first so that no thread is left with a big one at the end
    (``memcopy.copy_and_hash``).
    """
    sums = [""] * len(pairs)

    def one(index: int) -> None:
        sums[index] = copy_and_hash(*pairs[index])

    order = sorted(range(len(pairs)), key=lambda i: -pairs[i][1].nbytes)
    share_out([functools.partial(one, i) for i in order])
    return sums


def share_out(tasks: Sequence[Callable[[], None]]) -> None:
    """Run ``tasks`` on the pool's workers and the calling thread, each taking the next task
    from one shared list; returns when all are done. After a task's error the others take no
    new task, and the error is raised once no helper is still running."""
    lock = threading.Lock()
    position = [0]

    def stop() -> None:
        with lock:
            position[0] = len(tasks)

    def work() -> None:
        while True:
            with lock:
                index = position[0]
                position[0] = index + 1
            if index >= len(tasks):
                return
            try:
                tasks[index]()
            except BaseException:
                stop()  # the snapshot failed: the others need not finish it
                raise

    helpers = min(max(1, knobs.IO_THREADS), len(tasks) - 1)
    futures = [io_pool().submit(work) for _ in range(max(0, helpers))]
    try:
        work()
    finally:  # after an error too, no helper is still working once we return
        stop()
        drain(futures)  # helpers that never started are cancelled: nothing left for them
    for future in futures:
        if not future.cancelled():
            future.result()  # re-raise a helper's error


def _forget_after_fork() -> None:
    global _pool, _size
    _pool, _size = None, 0


def exiting() -> bool:
    """Whether interpreter exit has begun (see ``_mark_exiting``): new I/O runs inline, and
    a new async save too, since the interpreter would no longer join its thread."""
    return _exiting


def _mark_exiting() -> None:
    """At interpreter exit, before ``concurrent.futures`` stops every thread pool for good.

    After that no pool accepts work ("cannot schedule new futures after shutdown"), yet a
    save or load in an ``atexit`` handler (a final checkpoint) must still work: from here on
    the I/O runs in the calling thread. Exit hooks run newest first: asyncsave's hook, which
    lets in-flight saves finish on the pool, is registered after this one and runs before it.
    """
    global _exiting
    _exiting = True


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_after_fork)
_register_exit_hook = getattr(threading, "_register_atexit", None)
if _register_exit_hook is not None:  # CPython; registered after concurrent.futures' own hook
    _register_exit_hook(_mark_exiting)
