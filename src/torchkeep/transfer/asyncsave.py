"""The one save pipeline: prepare -> stage -> write -> commit, in the background or inline.

``save_async`` validates and encodes the object in the caller's thread, snapshots the tensor
bytes into a reusable staging buffer (pinned host memory when tensors live on CUDA), and hands
the write and commit to a background thread; the caller is blocked only for the snapshot.
A synchronous save is the same pipeline run inline and waited for, without the snapshot copy
(the caller cannot mutate tensors while it waits).

At most one save is in flight per :class:`AsyncSaver`: the next save first waits for the
previous one, so staging memory stays bounded by the largest save and is reused. Save threads
are not daemons and an ``atexit`` hook waits too, so interpreter exit finishes an in-flight save;
a save started after that (from an ``atexit`` handler) runs inline.
A crash during the background write leaves only the previous, committed file.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
import weakref
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from .. import knobs
from ..format.layout import Entry
from ..storage.aligned import align_up
from ..storage.io import ops
from ..storage.local import atomic_file
from ..storage.urls import backend_for, is_url, normalize
from .direct_writer import direct_alignment
from .overlap import DeferredCopy, cancel, register
from .pool import exiting, parallel_copy
from .writer import PreparedFile, PreparedPayload, prepare, write_prepared


class SaveHandle:
    """A save that may still be running: ``done()``, ``wait()``/``result()``, ``exception()``."""

    def __init__(self, description: str) -> None:
        self.description = description
        self._event = threading.Event()
        self._error: BaseException | None = None
        self._value: Any = None
        self._seen = False  # someone looked at the outcome

    def _run(self, job: Callable[[], Any]) -> None:
        try:
            self._value = job()
        except BaseException as exc:  # handed to whoever waits
            self._error = exc
        finally:
            self._event.set()

    def done(self) -> bool:
        """True once the save committed or failed."""
        return self._event.is_set()

    def wait(self, timeout: float | None = None) -> Any:
        """Block until the save finished; re-raise its error. Returns the job's result."""
        if not self._event.wait(timeout):
            raise TimeoutError(f"{self.description}: still saving after {timeout} s")
        self._seen = True
        if self._error is not None:
            raise self._error
        return self._value

    result = wait

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """The background error (None on success), after waiting for the save to finish."""
        if self._event.wait(timeout):
            self._seen = True
        return self._error

    def __repr__(self) -> str:
        state = "failed" if self._error else "done" if self.done() else "running"
        return f"SaveHandle({self.description!r}, {state})"


#: CPU tensors from this size on are copied by several threads at once (``pool.parallel_copy``);
#: smaller ones by the caller with one ``np.copyto`` each, whose per-call cost is lowest.
_SHARED_COPY_BYTES = 1 << 20


class Stager:
    """One reusable host buffer that receives a snapshot of every tensor of a save."""

    def __init__(self, pin: bool | None = None) -> None:
        self.pin = pin  # None: pin when a tensor lives on CUDA and CUDA is available
        self.buffer: torch.Tensor | None = None
        self.pinned = False
        self._wanted_pin = False

    def _reserve(self, nbytes: int, pin: bool) -> torch.Tensor:
        buf = self.buffer
        if buf is not None and buf.numel() >= nbytes and self._wanted_pin == pin:
            return buf
        self.buffer = None  # drop the old buffer before allocating its successor
        self.pinned = False
        self._wanted_pin = pin
        if pin:
            try:
                self.buffer = torch.empty(max(nbytes, 1), dtype=torch.uint8, pin_memory=True)
                self.pinned = True
            except RuntimeError:  # no CUDA driver: pageable memory works, only slower
                pass
        if self.buffer is None:
            self.buffer = torch.empty(max(nbytes, 1), dtype=torch.uint8)
        return self.buffer

    def stage(self, prepared: PreparedFile) -> PreparedFile:
        """Copy every entry's bytes into the buffer and point the entries at the copies."""
        self.stage_deferred(prepared, None)
        return prepared

    def stage_deferred(
        self, prepared: PreparedFile, defer: Callable[[Entry], bool] | None
    ) -> DeferredCopy | None:
        """:meth:`stage`, except for the entries ``defer`` selects (returned, to copy later).

        Entries for which ``defer(entry)`` is true are not copied now: they are returned as a
        :class:`DeferredCopy` (the overlapped snapshot, ``overlap.py``) for a background thread.

        The copies are laid out as an image of the file: page-aligned, each entry at its file
        offset, the header's room left blank. A direct-I/O write then goes straight from the
        snapshot to the disk without a second copy (``format/direct_writer.py``).
        """
        on_cuda = any(e.source.device.type == "cuda" for e in prepared.entries)
        pin = self.pin if self.pin is not None else on_cuda and torch.cuda.is_available()
        data_start = len(prepared.header_bytes())
        align = direct_alignment()
        size = align_up(data_start + prepared.data_bytes, align)
        buf = self._reserve(size + align, pin)
        skip = -buf.data_ptr() % align
        image = buf[skip : skip + size]
        shared = []
        later = DeferredCopy(f"entries of {len(prepared.entries)}", self.pinned) if defer else None
        for entry in prepared.entries:
            src = entry.source.detach().reshape(-1)
            if src.dtype != torch.uint8:
                src = src.view(torch.uint8)
            dst = image[data_start + entry.begin : data_start + entry.end]
            if later is not None and defer is not None and defer(entry):
                later.add(entry, src, dst)
                continue
            if src.device.type != "cpu":
                dst.copy_(src, non_blocking=self.pinned)
            elif src.numel() < _SHARED_COPY_BYTES:
                np.copyto(dst.numpy(), src.numpy())  # small: a plain memcpy, no hand-off cost
            else:
                shared.append((dst.numpy(), src.numpy()))
            entry.source = dst
        parallel_copy(shared, knobs.SNAPSHOT_PIECE_BYTES)
        if on_cuda:
            torch.cuda.synchronize()
        prepared.image = image
        return later if later is not None and later.items else None

    def release(self) -> None:
        """Free the staging memory (it is re-allocated by the next async save)."""
        self.buffer = None
        self.pinned = False


class AsyncSaver:
    """Runs save jobs one at a time, in a background thread or inline."""

    def __init__(self) -> None:
        self.stager = Stager()
        self._lock = threading.Lock()
        self._current: SaveHandle | None = None
        _SAVERS.add(self)

    @property
    def in_flight(self) -> SaveHandle | None:
        """The running save, if any."""
        current = self._current
        return current if current is not None and not current.done() else None

    def wait_previous(self) -> SaveHandle | None:
        """Wait (without raising) for the previous save; returns its handle."""
        previous = self._current
        if previous is not None:
            previous._event.wait()  # not exception(): that would mark the outcome as seen
        return previous

    def start(
        self,
        job: Callable[[], Any],
        prepared: PreparedFile,
        description: str,
        *,
        background: bool,
        defer: Callable[[Entry], bool] | None = None,
    ) -> SaveHandle:
        """Run ``job`` after the previous save finished; snapshot ``prepared`` if in background.

        With ``defer``, the entries it selects are copied by the background thread before
        ``job`` runs (an overlapped snapshot); optimizer steps wait for that copy.
        """
        with self._lock:
            self.wait_previous()
            background = background and not exiting()  # a save from an atexit handler
            later = None
            if background:
                later = self.stager.stage_deferred(prepared, defer)  # raises: none in flight
            handle = SaveHandle(description)
            self._current = handle
            if not background:
                handle._run(job)
                return handle
            run = job
            if later is not None:
                later.description = description
                register(later)
                run = _after(later, job)
            thread = threading.Thread(
                target=handle._run, args=(run,), name="torchkeep-save", daemon=False
            )
            try:
                thread.start()
            except BaseException:
                if later is not None:
                    cancel(later)
                self._current = None
                raise
            return handle


def _after(copy: DeferredCopy, job: Callable[[], Any]) -> Callable[[], Any]:
    """``job`` preceded by the deferred snapshot copy (whose failure fails the save)."""

    def run() -> Any:
        copy.run()
        return job()

    return run


_SAVERS: weakref.WeakSet[AsyncSaver] = weakref.WeakSet()
_DEFAULT = AsyncSaver()


def _wait_all() -> None:
    """At exit: finish in-flight saves; report (do not hide) a failure nobody waited for."""
    for saver in list(_SAVERS):
        handle = saver.wait_previous()
        if handle is None:
            continue
        error = handle._error
        if error is not None and not handle._seen:
            print(
                f"torchkeep: background save {handle.description} failed: {error}", file=sys.stderr
            )


# Interpreter exit first runs threading's own exit hooks (which shut down thread pools, the
# writer's included) and only then joins threads and runs atexit. Waiting from a threading exit
# hook registered after the pools' hook (hooks run newest first) lets the save finish.
_register = getattr(threading, "_register_atexit", None)
if _register is not None:
    _register(_wait_all)
else:  # pragma: no cover - other Python implementations
    atexit.register(_wait_all)


def write_file(
    prepared: PreparedFile, path: str, storage_options: dict[str, Any] | None = None
) -> str:
    """Write ``prepared`` to a temporary next to ``path``, fsync, and rename it into place.

    A URL streams to the object store instead (``storage/upload.py``): the object appears
    whole when the upload completes, or not at all.
    """
    if is_url(path):
        backend_for(path, storage_options).write_payload(path, PreparedPayload(prepared))
        return path
    with atomic_file(path, prepared.total_bytes) as fd:
        write_prepared(prepared, fd, ops())
    return path


def save_async(
    obj: Any,
    path: str | os.PathLike[str],
    *,
    metadata: dict[str, str] | None = None,
    storage_options: dict[str, Any] | None = None,
) -> SaveHandle:
    """Start saving ``obj`` to ``path``; returns once the tensors are snapshotted.

    The object is validated first (errors raise here, before anything is written). If a
    previous ``save_async`` is still running this call waits for it first (one in flight).
    Errors of the background write are raised by the handle's ``wait()``/``result()``.
    ``path`` may be an fsspec URL (``storage_options`` configure its filesystem).
    """
    path = normalize(path)
    prepared = prepare(obj, metadata)
    return _DEFAULT.start(
        lambda: write_file(prepared, path, storage_options), prepared, path, background=True
    )


def save_blocking(
    obj: Any,
    path: str,
    *,
    metadata: dict[str, str] | None = None,
    storage_options: dict[str, Any] | None = None,
) -> None:
    """The synchronous save: the same pipeline run inline, without a snapshot copy."""
    path = normalize(path)
    prepared = prepare(obj, metadata)
    _DEFAULT.start(
        lambda: write_file(prepared, path, storage_options), prepared, path, background=False
    ).wait()
