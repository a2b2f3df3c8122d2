"""Asynchronous sharded saves: each rank blocks only for a snapshot of its own state.

The snapshot copies every tensor this rank will write (DTensor local shards included) and
deep-copies the plain values, so training may change the live objects at once. The DCP save of
the snapshot (every rank's file durable, then the coordinator's commit) runs in a background
thread on torchkeep's own gloo group, so its collectives never interleave with the training
loop's. At most one save per process is in flight: the next save or load waits for it first.
"""

from __future__ import annotations

import collections
import copy
import threading
from collections.abc import Callable
from typing import Any

import torch
from torch.distributed.tensor import DTensor

from .. import knobs
from ..transfer.asyncsave import SaveHandle
from ..transfer.pool import parallel_copy

#: CPU tensors from this size on are staged into reused buffers by several threads at once.
_SHARED_COPY_BYTES = 1 << 20

_lock = threading.Lock()
_current: SaveHandle | None = None


class Staging:
    """Reusable copies of the tensors of the last async save, keyed by their path in the state.

    A save of the same model reuses last save's buffers (no allocation, no page faults: the
    copy runs at memory speed). Large CPU tensors are copied by the I/O pool's threads and the
    caller together (``pool.parallel_copy``). Only touched after the previous save finished.
    """

    def __init__(self) -> None:
        self.buffers: dict[tuple, torch.Tensor] = {}
        self._used: dict[tuple, torch.Tensor] = {}
        self._pairs: list = []

    def snapshot(self, obj: Any) -> Any:
        """A copy of ``obj`` sharing no tensor memory and no mutable container with it."""
        self._used, self._pairs = {}, []
        try:
            out = self._copy(obj, ())
            parallel_copy(self._pairs, knobs.SNAPSHOT_PIECE_BYTES)
        finally:
            self.buffers, self._pairs = self._used, []
        return out

    def _copy(self, obj: Any, path: tuple) -> Any:
        if isinstance(obj, DTensor):
            local = self._tensor(obj.to_local(), path)
            return DTensor.from_local(
                local,
                obj.device_mesh,
                obj.placements,
                run_check=False,
                shape=obj.shape,
                stride=obj.stride(),
            )
        if isinstance(obj, torch.Tensor):
            return self._tensor(obj, path)
        if isinstance(obj, dict):
            out = {k: self._copy(v, (*path, k)) for k, v in obj.items()}
            return collections.OrderedDict(out) if isinstance(obj, collections.OrderedDict) else out
        if isinstance(obj, list):
            return [self._copy(v, (*path, i)) for i, v in enumerate(obj)]
        if type(obj) is tuple:
            return tuple(self._copy(v, (*path, i)) for i, v in enumerate(obj))
        return copy.deepcopy(obj)

    def _tensor(self, t: torch.Tensor, path: tuple) -> torch.Tensor:
        t = t.detach()
        if (
            t.device.type != "cpu"
            or not t.is_contiguous()
            or t.numel() * t.element_size() < (_SHARED_COPY_BYTES)
        ):
            return t.clone()
        old = self.buffers.get(path)
        if old is not None and old.dtype == t.dtype and old.shape == t.shape:
            dst = old
        else:
            dst = torch.empty_like(t, memory_format=torch.contiguous_format)
        self._used[path] = dst
        self._pairs.append((_bytes(dst), _bytes(t)))
        return dst


def _bytes(t: torch.Tensor) -> Any:
    return t.reshape(-1).view(torch.uint8).numpy()


_STAGING = Staging()


def snapshot(obj: Any) -> Any:
    """A copy of ``obj`` that shares no tensor memory and no mutable container with it."""
    return _STAGING.snapshot(obj)


def wait_in_flight() -> None:
    """Wait for this process's running background save; raise its error if nobody has."""
    handle = _current
    if handle is not None and not handle._seen:
        handle.wait()


def start(job: Callable[[], Any], description: str) -> SaveHandle:
    """Run ``job`` in a background thread after the previous save finished."""
    global _current
    with _lock:
        wait_in_flight()
        handle = SaveHandle(description)
        _current = handle
        thread = threading.Thread(
            target=handle._run, args=(job,), name="torchkeep-dist-save", daemon=False
        )
        thread.start()
        return handle
