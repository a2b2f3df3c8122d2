"""CheckpointManager: numbered steps in a run directory, atomic commits, restore, retention.

Layout (docs/run-directory.md): ``RUN_DIR/step-<10-digit step>/`` holding ``state.tk`` (the
captured training state) and ``meta.json`` (step, time, metrics, files with sizes, version).
A step is assembled in a temporary directory and becomes visible by one atomic rename after
its files are fsynced; readers list only committed ``step-*`` directories, so ``latest`` is
found by scanning, never through a pointer file that can lie. Deletion renames a step to a
temporary name first. Temporaries of dead writers are swept when a manager opens.
"""

from __future__ import annotations

import json
import os
import re
import time
import warnings
from collections.abc import MutableMapping
from dataclasses import dataclass, field
from typing import Any

from . import retention
from .asyncsave import AsyncSaver, SaveHandle
from .checkpoint import load_checkpoint
from .errors import CheckpointNotFoundError, CorruptionError, FormatError, TorchkeepError
from .format.writer import PreparedFile, prepare, write_prepared
from .state.capture import capture
from .storage.io import ops, write_all
from .storage.local import (
    atomic_file,
    commit_dir,
    discard_dir,
    is_temp,
    make_temp_dir,
    sweep_temps,
)
from .storage.lock import LOCK_NAME, DirLock

STATE_FILE = "state.tk"
META_FILE = "meta.json"
_STEP_RE = re.compile(r"^step-(\d{10})$")


@dataclass
class StepInfo:
    """One committed step: number, directory, unix time of the save, bytes on disk, metrics."""

    step: int
    path: str
    time: float
    size: int
    metrics: dict = field(default_factory=dict)
    policy: dict | None = None  # retention policy of the manager that saved it (meta.json)


def step_dirname(step: int) -> str:
    """``step-0000001234``: zero-padded so names sort like numbers."""
    return f"step-{step:010d}"


def _read_meta(path: str) -> dict:
    try:
        with open(os.path.join(path, META_FILE), encoding="utf-8") as f:
            meta = json.load(f)
        return meta if isinstance(meta, dict) else {}
    except (OSError, ValueError):
        return {}


def _dir_size(path: str) -> int:
    total = 0
    with os.scandir(path) as it:
        for entry in it:
            if entry.is_file(follow_symlinks=False):
                total += entry.stat(follow_symlinks=False).st_size
    return total


def list_steps(directory: str | os.PathLike) -> list[StepInfo]:
    """Committed steps of a run directory, oldest first (temporaries are never listed)."""
    directory = os.fspath(directory)
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    steps = []
    for name in names:
        match = _STEP_RE.match(name)
        path = os.path.join(directory, name)
        if match is None or not os.path.isdir(path) or os.path.islink(path):
            continue
        meta = _read_meta(path)
        stamp = meta.get("time")
        metrics = meta.get("metrics") if isinstance(meta.get("metrics"), dict) else {}
        try:
            if not isinstance(stamp, (int, float)):
                stamp = os.path.getmtime(path)
            size = _dir_size(path)
        except FileNotFoundError:  # retention deleted it while we listed: not a step anymore
            continue
        policy = meta.get("policy") if isinstance(meta.get("policy"), dict) else None
        steps.append(StepInfo(int(match[1]), path, float(stamp), size, metrics, policy))
    return sorted(steps, key=lambda s: s.step)


def list_leftovers(directory: str | os.PathLike) -> list[str]:
    """Paths of incomplete saves and half-deleted steps (temporaries) in a run directory."""
    directory = os.fspath(directory)
    try:
        names = sorted(os.listdir(directory))
    except FileNotFoundError:
        return []
    return [os.path.join(directory, n) for n in names if is_temp(n)]


def delete_step(directory: str, step: int) -> None:
    """Remove a committed step: rename it to a trash name (atomic), fsync, then delete it."""
    discard_dir(os.path.join(directory, step_dirname(step)))


def clean_metrics(metrics: dict | None) -> dict[str, Any]:
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


def _write_json(path: str, obj: dict) -> None:
    data = json.dumps(obj, indent=1, allow_nan=True).encode()
    with atomic_file(path, len(data)) as fd:
        write_all(ops(), fd, memoryview(data), 0)


def write_step(
    directory: str,
    step: int,
    prepared: PreparedFile,
    metrics: dict,
    stamp: float,
    policy: dict | None = None,
) -> str:
    """Write one step into a temporary directory and commit it by rename; returns its path."""
    from . import __version__

    target = os.path.join(directory, step_dirname(step))
    tmp = make_temp_dir(target)
    try:
        with atomic_file(os.path.join(tmp, STATE_FILE), prepared.total_bytes) as fd:
            write_prepared(prepared, fd, ops())
        files = [{"name": STATE_FILE, "size": os.path.getsize(os.path.join(tmp, STATE_FILE))}]
        meta = {
            "step": step,
            "time": stamp,
            "metrics": metrics,
            "files": files,
            "torchkeep_version": __version__,
        }
        if policy is not None:
            meta["policy"] = policy
        _write_json(os.path.join(tmp, META_FILE), meta)
        commit_dir(tmp, target)
    except BaseException:
        if os.path.isdir(tmp):
            ops().rmtree(tmp)
        raise
    return target


class CheckpointManager:
    """Save numbered training steps into ``directory``, restore the latest, apply retention.

    ``keep_last``/``keep_best`` (by ``monitor``, ``mode`` "min"/"max")/``keep_every`` combine
    by union; the newest and the best step are never deleted. ``async_save=True`` returns from
    :meth:`save` once tensors are snapshotted; at most one save is in flight (the next save
    waits for it) and a background error is raised by the next call. ``rng=False`` skips RNG
    state. The first save takes the directory's writer lock until :meth:`close`.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        keep_last: int | None = None,
        keep_best: int | None = None,
        monitor: str | None = None,
        mode: str = "min",
        keep_every: int | None = None,
        async_save: bool = False,
        rng: bool = True,
    ) -> None:
        retention.validate_policy(keep_last, keep_best, monitor, mode, keep_every)
        self.directory = os.path.abspath(os.fspath(directory))
        self.policy = dict(
            keep_last=keep_last,
            keep_best=keep_best,
            monitor=monitor,
            mode=mode,
            keep_every=keep_every,
        )
        self.async_save = async_save
        self.rng = rng
        self.last_restore_note: str | None = None
        os.makedirs(self.directory, exist_ok=True)
        self._lock = DirLock(self.directory)
        self._saver = AsyncSaver()
        self._handle: SaveHandle | None = None
        self._reported = True
        self._closed = False
        sweep_temps(self.directory)

    # -- saving ------------------------------------------------------------------------------
    def save(
        self, step: int, state: MutableMapping[str, Any], metrics: dict | None = None
    ) -> SaveHandle:
        """Commit ``state`` as ``step`` (then apply retention); returns the save's handle."""
        self._check_open()
        if type(step) is not int or step < 0:
            raise TorchkeepError(f"step={step!r}: steps are non-negative ints")
        self._saver.wait_previous()
        self._raise_background()
        self._lock.acquire()
        if os.path.lexists(os.path.join(self.directory, step_dirname(step))):
            raise TorchkeepError(
                f"{self.directory}: step {step} already exists and steps are immutable; "
                "save under a new step number or delete that step first"
            )
        clean = clean_metrics(metrics)
        prepared = prepare(capture(state, rng=self.rng))
        stamp = time.time()

        def job() -> str:
            path = write_step(self.directory, step, prepared, clean, stamp, self.policy)
            retention.prune(self.directory, **self.policy, lock=False)
            return path

        handle = self._saver.start(
            job, prepared, f"{self.directory} step {step}", background=self.async_save
        )
        self._handle, self._reported = handle, False
        if not self.async_save:
            self._reported = True
            handle.wait()
        return handle

    def _raise_background(self) -> None:
        handle = self._handle
        if handle is not None and not self._reported and handle.done():
            self._reported = True
            error = handle.exception()
            if error is not None:
                raise error

    def wait(self) -> None:
        """Block until the in-flight save committed; raise its error if it failed."""
        self._saver.wait_previous()
        self._raise_background()

    # -- reading -----------------------------------------------------------------------------
    def steps(self) -> list[StepInfo]:
        """Committed steps, oldest first."""
        return list_steps(self.directory)

    def latest_step(self) -> int | None:
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
        return retention.kept_reasons(self.steps(), **self.policy)

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
        steps = self.steps()
        if step is not None:
            chosen = [s for s in steps if s.step == step]
            if not chosen:
                have = ", ".join(str(s.step) for s in steps[-10:]) or "none"
                raise CheckpointNotFoundError(
                    f"{self.directory}: no committed step {step} (latest steps: {have})"
                )
            steps = chosen
        if not steps:
            return None
        skipped: list[str] = []
        for info in reversed(steps):
            path = os.path.join(info.path, STATE_FILE)
            try:
                load_checkpoint(path, state, rng=self.rng)
            except (CorruptionError, FormatError, OSError) as exc:
                if not fallback or step is not None:
                    raise
                skipped.append(f"step {info.step}: {exc}")
                continue
            if skipped:
                self.last_restore_note = (
                    f"restored step {info.step} because newer steps failed: " + "; ".join(skipped)
                )
                warnings.warn(self.last_restore_note, stacklevel=2)
            return info.step
        raise CorruptionError(f"{self.directory}: no step could be restored: " + "; ".join(skipped))

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
        finally:
            self._closed = True
            self._saver.stager.release()
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
