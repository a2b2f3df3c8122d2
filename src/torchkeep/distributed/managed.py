"""``CheckpointManager`` inside a process group: numbered sharded steps, same API and layout.

:class:`torchkeep.CheckpointManager` hands its calls here when ``torch.distributed`` is
initialized. Each step is a sharded checkpoint (:func:`torchkeep.distributed.save`) in the
run-directory layout of single-process steps (``step-<10 digits>/``, plus ``meta.json`` with
time, metrics and policy written by the coordinator before the commit), so ``torchkeep ls``,
``prune`` and the manager's retention (``keep_last``/``keep_best``/``keep_every``) treat both
kinds alike. Only the coordinator (rank 0) lists, locks and deletes; what it found or decided
is broadcast on torchkeep's checkpoint group, so every rank agrees on the latest step and on
every failure (no rank raises alone while the others wait).
"""

from __future__ import annotations

import json
import os
import time
import warnings
from collections.abc import Callable, Mapping, MutableMapping
from typing import Any, TypeVar

import torch.distributed as dist

from .. import retention
from .._version import __version__
from ..checkpoint import load_checkpoint
from ..errors import (
    CorruptionError,
    DistributedCheckpointError,
    FormatError,
    TorchkeepError,
)
from ..storage.io import ops, write_all
from ..storage.local import atomic_file
from ..storage.lock import DirLock
from ..storage.run_dir import (
    META_FILE,
    STATE_FILE,
    StepInfo,
    candidates,
    join,
    list_steps,
    step_exists,
)
from ..transfer.asyncsave import SaveHandle
from . import api, background
from . import metadata as meta

T = TypeVar("T")


def active() -> bool:
    """Whether a process group is initialized (the manager then saves sharded steps)."""
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if active() else 0


def coordinated(action: str, run: Callable[[], T], timeout: float | None = None) -> T:
    """Run ``run`` on the coordinator only; every rank gets its result or raises its error.

    The coordinator's exception (lock held, step exists, a listing failed) is re-raised on
    every rank with its type when it is a :class:`TorchkeepError`, so no rank waits alone.
    """
    group = api.checkpoint_group(timeout)
    box: list[Any] = [None]
    error: Exception | None = None
    if _rank() == 0:
        try:
            box[0] = ("ok", run())
        except Exception as exc:  # handed to every rank below
            box[0] = ("error", (type(exc), str(exc)))
            if group is None:
                raise
            error = exc
    if group is not None:
        _collective(action, lambda: dist.broadcast_object_list(box, src=0, group=group))
    kind, value = box[0]
    if kind == "error":
        if error is not None:
            raise error
        cls, message = value
        if isinstance(cls, type) and issubclass(cls, TorchkeepError):
            try:
                same = cls(message)
            except TypeError:  # a class whose constructor takes more than a message
                same = None
            if same is not None:
                raise same
        raise TorchkeepError(f"{action} failed on rank 0: {cls.__name__}: {message}")
    return value


def _collective(action: str, run: Callable[[], Any]) -> None:
    """A collective on the checkpoint group; a broken one (a rank died or timed out) raises
    :class:`DistributedCheckpointError` on the ranks that are left, never a bare RuntimeError."""
    try:
        run()
    except RuntimeError as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DistributedCheckpointError(
            f"{action}: a collective with the other ranks broke ({first}); a rank probably "
            "died or timed out. Restart the job and restore the last committed step."
        ) from exc


class DistributedSteps:
    """The engine of a :class:`~torchkeep.CheckpointManager` whose ranks form a process group."""

    def __init__(
        self,
        directory: str,
        policy: Mapping[str, Any],
        *,
        async_save: bool,
        rng: bool,
        lock: DirLock | None,
    ) -> None:
        if "://" in directory:
            raise TorchkeepError(
                f"{directory}: sharded steps (a CheckpointManager inside a process group) need "
                "a directory every rank sees (a shared filesystem); object-store URLs are not "
                "supported for them yet"
            )
        self.directory = os.path.abspath(directory)
        self.policy = policy
        self.async_save = async_save
        self.rng = rng
        self._lock = lock
        self._handle: SaveHandle | None = None
        self._reported = True

    # -- saving ------------------------------------------------------------------------------
    def save(
        self, step: int, state: MutableMapping[str, Any], metrics: dict[str, Any]
    ) -> SaveHandle:
        """Every rank: commit ``state`` as sharded ``step``, then the coordinator's retention."""
        self.wait()
        coordinated("save", lambda: self._may_save(step))
        stamp = time.time()
        path = join(self.directory, f"step-{step:010d}")

        def write_meta(tmp_dir: str) -> None:
            self._write_meta(tmp_dir, step, stamp, metrics)

        handle = api.save(
            state,
            path,
            rng=self.rng,
            async_save=self.async_save,
            before_commit=write_meta,
            after_commit=self._prune,
        )
        if handle is None:  # synchronous: already committed and pruned
            handle = SaveHandle(f"{path} (sharded)")
            handle._run(lambda: path)
            handle._seen = True
            return handle
        self._handle, self._reported = handle, False
        return handle

    def _may_save(self, step: int) -> None:
        """Coordinator: take the writer lock and refuse a step that exists."""
        if self._lock is not None:
            self._lock.acquire()
        if step_exists(self.directory, step):
            raise TorchkeepError(
                f"{self.directory}: step {step} already exists and steps are immutable; "
                "save under a new step number or delete that step first"
            )

    def _write_meta(self, tmp_dir: str, step: int, stamp: float, metrics: dict) -> None:
        """Coordinator, before the commit: ``meta.json`` as single-process steps have it."""
        names = sorted(n for n in os.listdir(tmp_dir) if n.endswith(".safetensors"))
        names.append(meta.METADATA_FILE)
        files = [{"name": n, "size": os.stat(os.path.join(tmp_dir, n)).st_size} for n in names]
        body = json.dumps(
            {
                "step": step,
                "time": stamp,
                "metrics": metrics,
                "files": files,
                "torchkeep_version": __version__,
                "policy": self.policy,
                "sharded": True,
            },
            indent=1,
        ).encode()
        with atomic_file(os.path.join(tmp_dir, META_FILE), len(body)) as fd:
            write_all(ops(), fd, memoryview(body), 0)

    def _prune(self) -> None:
        """Every rank, after the commit: the coordinator applies retention, the others wait."""
        coordinated(
            "retention",
            lambda: retention.prune(self.directory, **self.policy, lock=False),
        )

    def wait(self) -> None:
        """Block until this rank's in-flight save finished; raise its error once."""
        handle = self._handle
        if handle is not None and not self._reported:
            self._reported = True
            handle.wait()
        background.wait_in_flight()

    # -- reading -----------------------------------------------------------------------------
    def steps(self) -> list[StepInfo]:
        """Committed steps as the coordinator lists them (the same list on every rank)."""
        self.wait()  # the listing is a collective on the group an async save may be using
        return coordinated("listing steps", lambda: list_steps(self.directory))

    def restore(
        self, state: MutableMapping[str, Any], step: int | None, fallback: bool
    ) -> tuple[int | None, str | None]:
        """Load the latest (or ``step``) into ``state`` on every rank: (step, fallback note)."""
        found = candidates([(s.step, s.path) for s in self.steps()], step, self.directory)
        if not found:
            return None, None
        skipped: list[str] = []
        for number, path in reversed(found):
            try:
                self._load(path, state)
            except (CorruptionError, FormatError, OSError) as exc:
                if not fallback or step is not None:
                    raise
                skipped.append(f"step {number}: {exc}")
                continue
            note = None
            if skipped:
                note = f"restored step {number} because newer steps failed: " + "; ".join(skipped)
            return number, note
        raise CorruptionError(f"{self.directory}: no step could be restored: " + "; ".join(skipped))

    def _load(self, path: str, state: MutableMapping[str, Any]) -> None:
        if os.path.isfile(os.path.join(path, meta.METADATA_FILE)):
            api.load(state, path, rng=self.rng)
            return
        # A step saved by one process: every rank loads the whole state (plain or DDP models;
        # a sharded model needs a sharded step). Ranks agree on the outcome before going on.
        error: Exception | None = None
        try:
            load_checkpoint(join(path, STATE_FILE), state, rng=self.rng, follow_symlinks=False)
        except (CorruptionError, FormatError, OSError) as exc:
            error = exc
        _agree_on_error(error, path)


def _agree_on_error(error: Exception | None, path: str) -> None:
    """Raise on every rank when any rank failed (its own error, else a CorruptionError)."""
    group = api.checkpoint_group()
    failed = [error is not None]
    if group is not None:
        everyone: list[Any] = [None] * dist.get_world_size()
        _collective(
            f"loading {path}", lambda: dist.all_gather_object(everyone, failed[0], group=group)
        )
        bad = [r for r, f in enumerate(everyone) if f]
    else:
        bad = [0] if failed[0] else []
    if error is not None:
        raise error
    if bad:
        raise CorruptionError(f"{path}: rank(s) {bad} could not load this step")


def warn_note(note: str | None) -> None:
    if note is not None:
        warnings.warn(note, stacklevel=3)
