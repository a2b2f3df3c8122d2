"""Overlapped snapshots: copy parameters and optimizer state while training goes on.

Between ``CheckpointManager.save`` and the next ``optimizer.step()``, forward and backward only
read parameters and optimizer state (they write gradients), so their snapshot copy need not
block the caller. :class:`DeferredCopy` holds the copies still to do, with every source's
version counter and address recorded when the save was requested; a background thread runs
:meth:`DeferredCopy.run`. A global optimizer step pre-hook waits for every pending copy, so the
step that would change those tensors starts only once their bytes are safe.

The guard: after its copy each source's ``_version`` and ``data_ptr`` must be what they were at
``save``; otherwise the copy may mix two training steps and :class:`SnapshotRaceError` fails the
save (raised by the manager's next call). What it cannot see is documented in
docs/performance.md: writes through ``.data`` (a separate version counter), optimizers that do
not subclass ``torch.optim.Optimizer`` (no pre-hook, but their in-place update is caught by the
guard), and in-place edits made by C extensions that bypass autograd's version counter.

CUDA sources are copied into pinned staging with ``non_blocking`` copies on a side stream that
first waits for the caller's stream (the copy sees every kernel queued before ``save``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from ..errors import SnapshotRaceError
from ..format.layout import Entry
from .memcopy import copy_and_hash
from .pool import parallel_copy_hash


@dataclass
class _Pending:
    entry: Entry
    src: torch.Tensor  # the live tensor's bytes (flat uint8 view)
    dst: torch.Tensor  # its place in the staging image
    live: torch.Tensor  # the tensor whose version counter and address are guarded
    version: int
    ptr: int


#: Test hook: called with an entry key before that entry's deferred copy (tests use it to
#: change a tensor at a known moment, so the guard test does not depend on timing).
_copy_hook: Callable[[str], None] | None = None


def set_copy_hook(hook: Callable[[str], None] | None) -> None:
    """Install (or remove, with None) the per-entry hook run before each deferred copy."""
    global _copy_hook
    _copy_hook = hook


class DeferredCopy:
    """The snapshot copies a save left for the background, and the event marking them done."""

    def __init__(self, description: str, pinned: bool) -> None:
        self.description = description
        self.pinned = pinned
        self.items: list[_Pending] = []
        self.done = threading.Event()
        self.stream: torch.cuda.Stream | None = None
        # CUDA event recorded on the caller's stream at save time
        self.ready: torch.cuda.Event | None = None

    def add(self, entry: Entry, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Defer the copy of ``src`` (a flat view of ``entry.source``) into ``dst``."""
        live = entry.source
        self.items.append(_Pending(entry, src, dst, live, live._version, live.data_ptr()))
        if src.device.type == "cuda" and self.ready is None:
            self.ready = torch.cuda.Event()
            self.ready.record(torch.cuda.current_stream(src.device))

    @property
    def nbytes(self) -> int:
        return sum(p.dst.numel() for p in self.items)

    def run(self) -> None:
        """Copy every deferred tensor, then check that none changed meanwhile; always marks
        the copy done (a waiting optimizer step must never hang on a failed save)."""
        try:
            self._copy()
            self._check_versions()
        finally:
            self.done.set()
            _forget(self)

    def _copy(self) -> None:
        hook = _copy_hook
        shared: list[_Pending] = []
        stream = None
        for item in self.items:
            if hook is not None:
                hook(item.entry.key)
            if item.src.device.type == "cuda":
                if stream is None:
                    stream = torch.cuda.Stream(item.src.device)
                    if self.ready is not None:  # always, for CUDA items (add records it)
                        stream.wait_event(self.ready)
                with torch.cuda.stream(stream):
                    item.dst.copy_(item.src, non_blocking=self.pinned)
            elif hook is not None:
                item.entry.checksum = copy_and_hash(item.dst.numpy(), item.src.numpy())
            else:
                shared.append(item)
        # CPU tensors are hashed as they are copied (the source still cached), so the
        # background write has no hashing pass left; the GPU's copies are hashed by the writer
        pairs = [(item.dst.numpy(), item.src.numpy()) for item in shared]
        for item, digest in zip(shared, parallel_copy_hash(pairs), strict=True):
            item.entry.checksum = digest
        if stream is not None:
            stream.synchronize()
        for item in self.items:
            item.entry.source = item.dst

    def _check_versions(self) -> None:
        changed = [
            p.entry.key
            for p in self.items
            if p.live._version != p.version or p.live.data_ptr() != p.ptr
        ]
        if changed:
            shown = ", ".join(changed[:5]) + (" ..." if len(changed) > 5 else "")
            raise SnapshotRaceError(
                f"{self.description}: {len(changed)} tensor(s) changed in place while the "
                f"overlapped snapshot copied them ({shown}); the step was not written. Call "
                "optimizer.step() (a torch.optim.Optimizer) only after save, or save with "
                "snapshot='copy'"
            )


# -- the registry the optimizer pre-hook waits on ------------------------------------------------
_LOCK = threading.Lock()
_PENDING: set[DeferredCopy] = set()
_HOOK: object = None


def register(copy: DeferredCopy) -> None:
    """Make optimizer steps wait for ``copy`` (installs the global pre-hook once)."""
    global _HOOK
    with _LOCK:
        _PENDING.add(copy)
        if _HOOK is None:
            _HOOK = register_optimizer_step_pre_hook(_before_step)


def cancel(copy: DeferredCopy) -> None:
    """A deferred copy that will never run (its thread did not start): release waiters."""
    copy.done.set()
    _forget(copy)


def _forget(copy: DeferredCopy) -> None:
    with _LOCK:
        _PENDING.discard(copy)


def wait_copies() -> None:
    """Block until every pending deferred copy is done (successful or not)."""
    with _LOCK:
        pending = list(_PENDING)
    for copy in pending:
        copy.done.wait()


def _before_step(optimizer: object, args: object, kwargs: object) -> None:
    if _PENDING:  # unlocked peek: the common case (nothing pending) costs one set lookup
        wait_copies()
