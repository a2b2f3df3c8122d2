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

from ..asyncsave import SaveHandle

_lock = threading.Lock()
_current: SaveHandle | None = None


def snapshot(obj: Any) -> Any:
    """A copy of ``obj`` that shares no tensor memory and no mutable container with it."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        out = {k: snapshot(v) for k, v in obj.items()}
        return collections.OrderedDict(out) if isinstance(obj, collections.OrderedDict) else out
    if isinstance(obj, list):
        return [snapshot(v) for v in obj]
    if isinstance(obj, tuple) and type(obj) is tuple:
        return tuple(snapshot(v) for v in obj)
    return copy.deepcopy(obj)


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
