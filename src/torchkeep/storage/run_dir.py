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
import os
import posixpath
import re
from dataclasses import dataclass, field

from .._version import __version__
from .backend import LOCAL, Backend, BytesPayload, Listed, Payload
from .local import is_temp
from .upload import TEMP_PREFIX

STATE_FILE = "state.tk"
META_FILE = "meta.json"
#: meta.json files larger than this are not read (the size comes from the directory listing).
META_MAX_BYTES = 16 << 20
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
    except (OSError, ValueError):  # StorageError (truncated) is an OSError
        return {}
    return obj if isinstance(obj, dict) else {}


def _step_info(number: int, path: str, mtime: float, backend: Backend) -> StepInfo | None:
    entries = backend.list(path)
    if not backend.committed(path, entries):
        return None  # an object-store prefix without a valid commit marker: incomplete
    meta = read_meta(path, entries, backend)
    stamp = meta.get("time")
    if not isinstance(stamp, (int, float)):
        stamp = mtime
    metrics = meta.get("metrics") if isinstance(meta.get("metrics"), dict) else {}
    policy = meta.get("policy") if isinstance(meta.get("policy"), dict) else None
    size = sum(e.size for e in entries if e.kind == "file")
    return StepInfo(number, path, float(stamp), size, metrics, policy)


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
    policy: dict | None = None,
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
