"""The run-directory layout: numbered steps over a storage backend (docs/run-directory.md).

``RUN_DIR/step-<10-digit step>/`` holds ``state.tk`` (the captured training state) and
``meta.json`` (step, time, metrics, files with sizes, version). A step is assembled in private
and made visible by the backend's commit (a rename on local disks) after its files are durable;
readers list only committed ``step-*`` directories, so ``latest`` is found by scanning, never
through a pointer file that can lie. Deletion hides a step before removing its bytes.
Temporaries (``is_temp``) are incomplete saves or half-deleted steps: never listed as steps.

The manager writes steps; the run-directory reader, retention, ``state`` and the CLI read them,
all through this one module.
"""

from __future__ import annotations

import json
import math
import os
import posixpath
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from .._version import __version__
from ..errors import CheckpointNotFoundError, UnsafePathError
from .backend import LOCAL, Backend, BytesPayload, Listed, Payload
from .local import is_temp
from .upload import TEMP_PREFIX

STATE_FILE = "state.tk"
META_FILE = "meta.json"
#: meta.json files larger than this are not read (the size comes from the directory listing).
META_MAX_BYTES = 16 << 20
T = TypeVar("T", bound=tuple)
_STEP_RE = re.compile(r"^step-(\d{10})$")


@dataclass
class StepInfo:
    """One committed step: number, directory, unix time of the save, bytes on disk, metrics."""

    step: int
    path: str
    time: float
    size: int
    metrics: dict[str, Any] = field(default_factory=dict)
    #: retention policy of the manager that saved it (meta.json)
    policy: dict[str, Any] | None = None
    problems: list[str] = field(default_factory=list)  # meta.json values that were ignored


def join(directory: str, name: str) -> str:
    """``directory/name`` for local paths and URLs alike (URLs always use ``/``)."""
    if "://" in directory:
        return posixpath.join(directory, name)
    return os.path.join(directory, name)


def step_dirname(step: int) -> str:
    """``step-0000001234``: zero-padded so names sort like numbers."""
    return f"step-{step:010d}"


def read_meta(path: str, entries: list[Listed], backend: Backend = LOCAL) -> dict:
    """The ``meta.json`` object of the step at ``path`` ({} when absent, too big or invalid)."""
    meta = next((e for e in entries if e.name == META_FILE and e.kind == "file"), None)
    if meta is None or meta.size > META_MAX_BYTES:
        return {}
    data = bytearray(meta.size)
    try:
        backend.read_into(join(path, META_FILE), [(0, memoryview(data))])
        obj = json.loads(data.decode("utf-8"))
    except (OSError, ValueError, UnsafePathError):  # StorageError (truncated) is an OSError
        return {}
    return obj if isinstance(obj, dict) else {}


def _step_info(number: int, path: str, mtime: float, backend: Backend) -> StepInfo | None:
    entries = backend.list(path)
    if not backend.committed(path, entries):
        return None  # an object-store prefix without a valid commit marker: incomplete
    meta = read_meta(path, entries, backend)
    problems: list[str] = []
    stamp = _checked_time(meta.get("time"), problems)
    metrics = _checked_metrics(meta.get("metrics"), problems)
    policy = _checked_policy(meta.get("policy"), problems)
    size = sum(e.size for e in entries if e.kind == "file")
    return StepInfo(
        number, path, mtime if stamp is None else stamp, size, metrics, policy, problems
    )


# meta.json may have been written by someone else: every value is checked here, once, so that
# listing, retention and restore never meet a number they cannot compare or format (a 400-digit
# integer used to raise OverflowError in every command and block restoring any step).
_MAX_METRICS = 1000
_MAX_NAME = 256
_MAX_TEXT = 1000
_MAX_INT = 2**63
_MAX_TIME = 1e11  # year 5138: anything later is not a save time
_POLICY_COUNTS = ("keep_last", "keep_best", "keep_every")


def _checked_time(value: object, problems: list[str]) -> float | None:
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            stamp = float(value)
        except OverflowError:
            stamp = math.inf
        if 0 <= stamp < _MAX_TIME:
            return stamp
    problems.append("meta.json 'time' is not a plausible save time (ignored; mtime used)")
    return None


def _checked_metrics(value: object, problems: list[str]) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict) or len(value) > _MAX_METRICS:
        problems.append(f"meta.json 'metrics' is not a table of at most {_MAX_METRICS} (ignored)")
        return {}
    metrics = {}
    for name, metric in value.items():
        if not isinstance(name, str) or len(name) > _MAX_NAME:
            problems.append("meta.json metric with a name that is not short text (ignored)")
        elif _plain_metric(metric):
            metrics[name] = metric
        else:
            problems.append(f"meta.json metric {name[:60]!r} is not a number or text (ignored)")
    return metrics


def _plain_metric(value: object) -> bool:
    if value is None or isinstance(value, (bool, float)):
        return True
    if isinstance(value, int):
        return -_MAX_INT <= value <= _MAX_INT
    return isinstance(value, str) and len(value) <= _MAX_TEXT


def _checked_policy(value: object, problems: list[str]) -> dict[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        problems.append("meta.json 'policy' is not a retention policy (ignored)")
        return None
    ok = (
        isinstance(value, dict)
        and set(value) == {*_POLICY_COUNTS, "monitor", "mode"}
        and all(_count(value[k]) for k in _POLICY_COUNTS)
        and (value["monitor"] is None or _short(value["monitor"]))
        and value["mode"] in ("min", "max")
    )
    if not ok:
        problems.append("meta.json 'policy' is not a retention policy (ignored)")
        return None
    return value


def _count(value: object) -> bool:
    return value is None or (type(value) is int and 0 < value <= _MAX_INT)


def _short(value: object) -> bool:
    return isinstance(value, str) and 0 < len(value) <= _MAX_NAME


def list_steps(directory: str | os.PathLike, backend: Backend = LOCAL) -> list[StepInfo]:
    """Committed steps of a run directory, oldest first (temporaries are never listed)."""
    directory = os.fspath(directory)
    try:
        entries = backend.list(directory)
    except FileNotFoundError:
        return []
    steps: list[StepInfo] = []
    for entry in entries:
        match = _STEP_RE.match(entry.name)
        if match is None or entry.kind != "dir":
            continue
        try:
            path = join(directory, entry.name)
            info = _step_info(int(match[1]), path, entry.mtime, backend)
        except FileNotFoundError:  # retention deleted it while we listed: not a step anymore
            continue
        if info is not None:
            steps.append(info)
    return sorted(steps, key=lambda s: s.step)


def list_leftovers(directory: str | os.PathLike, backend: Backend = LOCAL) -> list[str]:
    """Paths of incomplete saves and half-deleted steps (temporaries) in a run directory.

    On an object store these are step prefixes without a valid commit marker and temporary
    upload keys.
    """
    directory = os.fspath(directory)
    try:
        entries = backend.list(directory)
    except FileNotFoundError:
        return []
    out = []
    for e in entries:
        path = join(directory, e.name)
        if is_temp(e.name) or e.name.startswith(TEMP_PREFIX):
            out.append(path)
        elif _STEP_RE.match(e.name) and e.kind == "dir" and backend is not LOCAL:
            try:
                if not backend.committed(path, backend.list(path)):
                    out.append(path)
            except FileNotFoundError:
                continue
    return out


def candidates(steps: list[T], step: int | None, directory: str) -> list[T]:
    """The ``(number, ...)`` entries a restore tries: all of them (newest last), or only
    ``step``, which must be among them."""
    if step is None:
        return steps
    chosen = [s for s in steps if s[0] == step]
    if not chosen:
        have = ", ".join(str(s[0]) for s in steps[-10:]) or "none"
        raise CheckpointNotFoundError(
            f"{directory}: no committed step {step} (latest steps: {have})"
        )
    return chosen


def step_exists(directory: str, step: int, backend: Backend = LOCAL) -> bool:
    """Whether anything (committed step or not) already holds the name of ``step``."""
    name = step_dirname(step)
    try:
        return any(e.name == name for e in backend.list(directory))
    except FileNotFoundError:
        return False


def delete_step(directory: str, step: int, backend: Backend = LOCAL) -> None:
    """Remove a committed step: hidden first (renamed to a trash name), then deleted."""
    backend.delete(join(directory, step_dirname(step)))


def _write_json(backend: Backend, path: str, obj: dict) -> None:
    backend.write_payload(path, BytesPayload(json.dumps(obj, indent=1, allow_nan=True).encode()))


def write_step(
    directory: str,
    step: int,
    state: Payload,
    metrics: dict,
    stamp: float,
    policy: Mapping[str, Any] | None = None,
    backend: Backend = LOCAL,
) -> str:
    """Write one step (``state.tk`` from ``state``, then ``meta.json``) and commit it.

    Returns the step's path. On any error the staged step is dropped and nothing is visible.
    """
    target = join(directory, step_dirname(step))
    staged = backend.stage(target)
    try:
        backend.write_payload(join(staged, STATE_FILE), state)
        listed = backend.list(staged)
        files = [{"name": e.name, "size": e.size} for e in listed if e.name == STATE_FILE]
        meta = {
            "step": step,
            "time": stamp,
            "metrics": metrics,
            "files": files,
            "torchkeep_version": __version__,
        }
        if policy is not None:
            meta["policy"] = policy
        _write_json(backend, join(staged, META_FILE), meta)
        backend.commit(staged, target)
    except BaseException:
        backend.abandon(staged)
        raise
    return target
