"""CheckpointManager: numbered steps in a run directory, atomic commits, restore, retention.

The layout (step names, listing, commit, deletion) lives in :mod:`torchkeep.storage.run_dir`;
this module captures the training state, hands the step to that layout (inline or in the
background) and applies retention. Temporaries of dead writers are swept when a manager opens.
"""

from __future__ import annotations

import os
import threading
import time
import warnings
from collections.abc import Mapping, MutableMapping
from typing import TYPE_CHECKING, Any

import torch.distributed as dist

from . import retention
from .checkpoint import SHARDED_METADATA, load_checkpoint
from .errors import CorruptionError, FormatError, TorchkeepError
from .state.capture import capture
from .state.deferrable import deferrable, skippable
from .state.versions import Baseline, Plan
from .storage.backend import LOCAL
from .storage.local import sweep_temps
from .storage.lock import LOCK_NAME, DirLock
from .storage.replicate import Replicator
from .storage.run_dir import (
    STATE_FILE,
    StepInfo,
    candidates,
    delete_step,
    join,
    list_leftovers,
    list_steps,
    step_dirname,
    step_exists,
    write_step,
)
from .storage.urls import backend_for, is_url, normalize, remote_backend_for
from .transfer.asyncsave import AsyncSaver, SaveHandle
from .transfer.overlap import wait_copies
from .transfer.writer import PreparedFile, PreparedPayload, prepare

if TYPE_CHECKING:  # imported on demand at run time (torch.distributed.checkpoint is slow)
    from .distributed.managed import DistributedSteps
#: ``snapshot=`` modes: write inline / copy then write in the background / copy parameters
#: and optimizer state in the background too (until the next optimizer step).
SNAPSHOT_MODES = ("sync", "copy", "overlap")


def clean_metrics(metrics: Mapping[str, Any] | None) -> dict[str, Any]:
    """Metrics as JSON numbers/strings (tensors and NumPy scalars become floats)."""
    out: dict[str, Any] = {}
    for key, value in (metrics or {}).items():
        if not isinstance(key, str):
            raise TorchkeepError(f"metrics key {key!r}: metric names must be strings")
        if isinstance(value, (str, bool, int)) or value is None:
            out[key] = value
            continue
        try:
            out[key] = float(value)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise TorchkeepError(
                f"metrics[{key!r}]: {type(value).__name__} is not a number; pass a float"
            ) from exc
    return out


def _snapshot_mode(snapshot: str | None, async_save: bool) -> str:
    if snapshot is None:
        return "copy" if async_save else "sync"
    if snapshot not in SNAPSHOT_MODES:
        raise TorchkeepError(f"snapshot={snapshot!r}: must be one of {', '.join(SNAPSHOT_MODES)}")
    return snapshot


def _state_path(step_path: str) -> str:
    """What ``load_checkpoint`` restores for a step: its ``state.tk``, or the step directory
    itself when it is a sharded step (saved inside a process group; resharded on load)."""
    if not is_url(step_path) and os.path.isfile(os.path.join(step_path, SHARDED_METADATA)):
        return step_path
    return join(step_path, STATE_FILE)


class CheckpointManager:
    """Save numbered training steps into ``directory``, restore the latest, apply retention.

    ``keep_last``/``keep_best`` (by ``monitor``, ``mode`` "min"/"max")/``keep_every`` combine
    by union; the newest and the best step are never deleted. ``async_save=True`` returns from
    :meth:`save` once tensors are snapshotted; at most one save is in flight (the next save
    waits for it) and a background error is raised by the next call. ``rng=False`` skips RNG
    state. The first save takes the directory's writer lock until :meth:`close`.

    ``directory`` may be an fsspec URL (``s3://bucket/run``; ``storage_options`` configure
    it): steps are committed by a marker written last (docs/remote.md); object stores have no
    writer lock, so one manager per remote run directory. ``replicate_to`` (a URL) makes two
    tiers: each step commits to the local ``directory`` and is then uploaded in the background
    and committed remotely; ``replica_policy`` (``keep_last=`` etc.; default keep all) is the
    remote retention. ``restore`` uses the newest step committed in either tier.

    ``snapshot`` chooses how :meth:`save` snapshots: ``"sync"`` (the default without
    ``async_save``) writes before returning; ``"copy"`` (``async_save=True``) copies every tensor,
    then writes in the background; ``"overlap"`` copies only buffers, RNG, loader state and plain
    values before returning and parameters/optimizer state in the background, while forward and
    backward run; the next ``optimizer.step()`` waits for that copy, and a tensor changed in place
    meanwhile fails the save (docs/performance.md says what that guard cannot see).
    ``incremental=True`` writes only tensors whose version counter or memory changed since this
    manager's previous step; the others refer to the earlier step's bytes (retention keeps
    referenced steps). ``verify_unchanged=True`` hashes those tensors to be sure.

    Inside an initialized ``torch.distributed`` process group every rank must make the same
    calls: steps are sharded (:mod:`torchkeep.distributed`, each rank writes its own file) and
    the coordinator (rank 0) lists, locks, prunes and broadcasts, so every rank agrees on the
    latest step. ``distributed=False`` keeps the single-process behaviour (e.g. rank 0 alone).
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        keep_last: int | None = None,
        keep_best: int | None = None,
        monitor: str | None = None,
        mode: str = "min",
        keep_every: int | None = None,
        async_save: bool = False,
        rng: bool = True,
        storage_options: dict[str, Any] | None = None,
        replicate_to: str | None = None,
        replica_policy: dict[str, Any] | None = None,
        snapshot: str | None = None,
        incremental: bool = False,
        verify_unchanged: bool = False,
        distributed: bool | None = None,
    ) -> None:
        retention.validate_policy(keep_last, keep_best, monitor, mode, keep_every)
        self.snapshot = _snapshot_mode(snapshot, async_save)
        self.incremental = incremental
        self.verify_unchanged = verify_unchanged
        self._baseline = Baseline()
        self.directory = normalize(directory)
        self.storage_options = storage_options
        self.backend = backend_for(self.directory, storage_options)
        if incremental and (self.backend is not LOCAL or replicate_to is not None):
            raise TorchkeepError(
                f"{self.directory}: incremental=True needs a local run directory without "
                "replicate_to (steps refer to earlier steps' files on the same disk); save "
                "full steps to object storage"
            )
        self.policy = retention.Policy(
            keep_last=keep_last,
            keep_best=keep_best,
            monitor=monitor,
            mode=mode,
            keep_every=keep_every,
        )
        self.async_save = self.snapshot != "sync"
        self.rng = rng
        self.distributed = distributed
        self.last_restore_note: str | None = None
        self._lock = DirLock(self.directory) if self.backend is LOCAL else None
        if self.backend is LOCAL:
            os.makedirs(self.directory, exist_ok=True)
            sweep_temps(self.directory)
        else:
            self._sweep_remote()
        self._saver = AsyncSaver()
        self._handle: SaveHandle | None = None
        self._reported = True
        self._closed = False
        self.replica: Replicator | None = None
        self._prune_lock = threading.Lock()
        self._group_engine: DistributedSteps | None = None  # made on demand
        if replicate_to is not None:
            self._start_replica(replicate_to, replica_policy or {})

    def _prune_tiers(self, url: str) -> None:
        """After a step reached the remote tier: each tier's retention (local steps still
        waiting for their upload are kept)."""
        assert self.replica is not None
        retention.prune(url, **self.replica_policy, lock=False, backend=self.replica.remote)
        self._prune_local()

    def _prune_local(self) -> None:
        """This tier's retention; serialized, since the save job and the replicator both call
        it. Steps still queued for the remote tier are kept."""
        with self._prune_lock:
            protect = self.replica.pending() if self.replica is not None else ()
            retention.prune(
                self.directory, **self.policy, lock=False, backend=self.backend, protect=protect
            )

    def _sweep_remote(self) -> None:
        """Remove unmarked step prefixes and temporary keys (incomplete saves)."""
        remote = remote_backend_for(self.directory, self.storage_options)  # the same, cached
        for path in list_leftovers(self.directory, remote):
            remote.remove(path)

    def _start_replica(self, url: str, policy: dict[str, Any]) -> None:
        if self.backend is not LOCAL or not is_url(url):
            raise TorchkeepError(
                f"replicate_to={url!r}: two tiers need a local directory and a URL to replicate "
                f"to (directory is {self.directory})"
            )
        retention.validate_policy(
            policy.get("keep_last"),
            policy.get("keep_best"),
            policy.get("monitor"),
            policy.get("mode", "min"),
            policy.get("keep_every"),
        )
        remote = remote_backend_for(url, self.storage_options)
        url = normalize(url)
        self.replica_policy = dict(policy)
        self.replica = Replicator(self.directory, url, remote, lambda: self._prune_tiers(url))
        for path in list_leftovers(url, remote):
            remote.remove(path)
        self.replica.resume()

    # -- saving ------------------------------------------------------------------------------
    def save(
        self, step: int, state: MutableMapping[str, Any], metrics: Mapping[str, Any] | None = None
    ) -> SaveHandle:
        """Commit ``state`` as ``step`` (then apply retention); returns the save's handle."""
        self._check_open()
        if type(step) is not int or step < 0:
            raise TorchkeepError(f"step={step!r}: steps are non-negative ints")
        group = self._group()
        if group is not None:
            return group.save(step, state, clean_metrics(metrics))
        self._saver.wait_previous()
        self._raise_background()
        if self._lock is not None:
            self._lock.acquire()
        if step_exists(self.directory, step, self.backend):
            raise TorchkeepError(
                f"{self.directory}: step {step} already exists and steps are immutable; "
                "save under a new step number or delete that step first"
            )
        clean = clean_metrics(metrics)
        plan = self._plan(step, prepare(capture(state, rng=self.rng)), state)
        prepared = plan.prepared
        stamp = time.time()
        sums: dict[str, str] = {}

        def job() -> str:
            path = write_step(
                self.directory,
                step,
                PreparedPayload(prepared, sums),
                clean,
                stamp,
                self.policy,
                backend=self.backend,
            )
            if self.incremental:
                self._baseline.commit(plan, step, sums)
            if self.replica is not None:
                self.replica.submit(step)
            self._prune_local()
            return path

        defer = deferrable(state) if self.snapshot == "overlap" else None
        handle = self._saver.start(
            job,
            prepared,
            f"{self.directory} step {step}",
            background=self.async_save,
            defer=defer,
        )
        self._handle, self._reported = handle, False
        if not self.async_save:
            self._reported = True
            handle.wait()
        return handle

    def _plan(self, step: int, prepared: PreparedFile, state: MutableMapping[str, Any]) -> Plan:
        """Which entries this step writes (all, unless incremental finds unchanged ones)."""
        if not self.incremental:
            return Plan(prepared, {}, {})
        existing = {s.step for s in list_steps(self.directory, self.backend)}
        where = f"{self.directory} step {step}"
        return self._baseline.plan(
            prepared, existing, skippable(state), self.verify_unchanged, where
        )

    def _raise_background(self) -> None:
        handle = self._handle
        if handle is not None and not self._reported and handle.done():
            self._reported = True
            error = handle.exception()
            if error is not None:
                raise error

    def wait(self) -> None:
        """Block until the in-flight save committed; raise its error if it failed."""
        wait_copies()
        if self._group_engine is not None:
            self._group_engine.wait()
        self._saver.wait_previous()
        self._raise_background()

    # -- reading -----------------------------------------------------------------------------
    def steps(self) -> list[StepInfo]:
        """Committed steps, oldest first (in a process group: the coordinator's list)."""
        group = self._group()
        if group is not None:
            return group.steps()
        return list_steps(self.directory, self.backend)

    def replica_steps(self) -> list[StepInfo]:
        """Steps committed in the remote tier (empty without ``replicate_to``)."""
        if self.replica is None:
            return []
        return list_steps(self.replica.remote_dir, self.replica.remote)

    def wait_replication(self, timeout: float | None = None) -> None:
        """Block until every step is committed remotely; raise the upload's error."""
        if self.replica is not None:
            self.replica.wait(timeout)

    def latest_step(self) -> int | None:
        """The newest committed step (None when the directory has none)."""
        steps = self.steps()
        return steps[-1].step if steps else None

    def best_step(self) -> int | None:
        """The step with the best ``monitor`` metric (None without a monitor or values)."""
        monitor = self.policy["monitor"]
        if not monitor:
            return None
        best = retention.keep_best(self.steps(), 1, monitor, self.policy["mode"])
        return next(iter(best), None)

    def kept_reasons(self) -> dict[int, list[str]]:
        """step -> why retention keeps it (for tables)."""
        steps = self.steps()
        return retention.with_referenced(steps, retention.kept_reasons(steps, **self.policy))

    def restore(
        self, state: MutableMapping[str, Any], step: int | None = None, fallback: bool = False
    ) -> int | None:
        """Load the latest (or ``step``) committed step into ``state``; returns the step.

        Returns None when there is no checkpoint. A corrupt step raises
        :class:`CorruptionError`; with ``fallback=True`` older steps are tried and
        :attr:`last_restore_note` (also a warning) says which step was used and why.
        """
        self._check_open()
        self.wait()
        self.last_restore_note = None
        group = self._group()
        if group is not None:
            number, self.last_restore_note = group.restore(state, step, fallback)
            if self.last_restore_note is not None:
                warnings.warn(self.last_restore_note, stacklevel=2)
            return number
        steps = candidates(self._restorable(), step, self.directory)
        if not steps:
            return None
        skipped: list[str] = []
        for number, paths in reversed(steps):
            error = self._restore_one(paths, state)
            if error is not None:
                if not fallback or step is not None:
                    raise error
                skipped.append(f"step {number}: {error}")
                continue
            if skipped:
                self.last_restore_note = (
                    f"restored step {number} because newer steps failed: " + "; ".join(skipped)
                )
                warnings.warn(self.last_restore_note, stacklevel=2)
            return number
        raise CorruptionError(f"{self.directory}: no step could be restored: " + "; ".join(skipped))

    def _restorable(self) -> list[tuple[int, list[str]]]:
        """(step, state-file paths to try in order: local tier first), oldest step first."""
        found: dict[int, list[str]] = {}
        for info in self.steps():
            found.setdefault(info.step, []).append(_state_path(info.path))
        for info in self.replica_steps():
            found.setdefault(info.step, []).append(_state_path(info.path))
        return sorted(found.items())

    def _restore_one(self, paths: list[str], state: MutableMapping[str, Any]) -> Exception | None:
        """Load the first of ``paths`` that verifies; the last error when none does."""
        error: Exception | None = None
        for path in paths:
            try:
                load_checkpoint(
                    path,
                    state,
                    rng=self.rng,
                    storage_options=self.storage_options,
                    follow_symlinks=False,  # a run directory may be someone else's
                )
                return None
            except (CorruptionError, FormatError, OSError) as exc:
                error = exc
        return error

    # -- process groups ------------------------------------------------------------------------
    def _group(self) -> DistributedSteps | None:
        """The sharded-step engine when a process group is initialized, else None."""
        if self.distributed is False or not (dist.is_available() and dist.is_initialized()):
            return None
        if self._group_engine is None:
            if self.replica is not None or self.incremental or self.snapshot == "overlap":
                raise TorchkeepError(
                    f"{self.directory}: replicate_to, incremental=True and snapshot='overlap' "
                    "are not supported inside a process group yet; use async_save=True there"
                )
            # Imported here, not at the top: torch.distributed.checkpoint adds about a second
            # to `import torchkeep`, and only runs inside a process group need it.
            from .distributed.managed import DistributedSteps

            self._group_engine = DistributedSteps(
                self.directory,
                self.policy,
                async_save=self.async_save,
                rng=self.rng,
                lock=self._lock,
            )
        return self._group_engine

    # -- lifetime ------------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise TorchkeepError(f"{self.directory}: this CheckpointManager is closed")

    def close(self) -> None:
        """Wait for the in-flight save, free staging memory and release the writer lock."""
        if self._closed:
            return
        try:
            self.wait()
            self.wait_replication()
        finally:
            self._closed = True
            self._saver.stager.release()
            if self._lock is not None:
                self._lock.release()

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.close()
            return
        try:
            self.close()
        except TorchkeepError:
            pass  # the exception already propagating is the one to see

    def __repr__(self) -> str:
        return f"CheckpointManager({self.directory!r}, {self.policy})"


__all__ = [
    "LOCK_NAME",
    "CheckpointManager",
    "StepInfo",
    "delete_step",
    "list_leftovers",
    "list_steps",
    "step_dirname",
]
