"""Numbered sharded steps in one run directory, with every rank agreeing on what exists.

``RUN_DIR/step-<10 digits>/`` holds one committed sharded checkpoint (``checkpoint.json`` plus
one file per rank), the naming ``CheckpointManager`` uses for single-process steps. Only the
coordinator (rank 0) lists the directory and deletes old steps; what it found is broadcast, so
every rank restores the same step even when a shared filesystem shows ranks different listings
for a moment. ``fallback=True`` walks back to older steps when the newest is damaged; every rank
sees the same failure (DCP gathers them), so every rank walks back together.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import MutableMapping
from typing import Any

import torch.distributed as dist

from ..errors import CheckpointNotFoundError, CorruptionError, FormatError, TorchkeepError
from ..storage.local import discard_dir
from . import api
from . import metadata as meta

_STEP_RE = re.compile(r"^step-(\d{10})$")


def step_path(run_dir: str | os.PathLike, step: int) -> str:
    """``RUN_DIR/step-0000001234``."""
    if type(step) is not int or not 0 <= step < 10**10:
        raise TorchkeepError(f"step {step!r}: must be an int in 0..9999999999")
    return os.path.join(os.fspath(run_dir), f"step-{step:010d}")


def _list_committed(run_dir: str) -> list[int]:
    try:
        names = os.listdir(run_dir)
    except FileNotFoundError:
        return []
    found = []
    for name in names:
        match = _STEP_RE.match(name)
        if match and os.path.isfile(os.path.join(run_dir, name, meta.METADATA_FILE)):
            found.append(int(match[1]))
    return sorted(found)


def _agreed(value: Any, timeout: float | None) -> Any:
    """Rank 0's ``value`` on every rank (itself when there is no process group)."""
    group = api.checkpoint_group(timeout)
    if group is None:
        return value
    box = [value if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]


def steps(run_dir: str | os.PathLike, *, timeout: float | None = None) -> list[int]:
    """Committed steps, oldest first, as the coordinator sees them (a collective)."""
    run_dir = os.fspath(run_dir)
    mine = _list_committed(run_dir) if _rank() == 0 else None
    return _agreed(mine, timeout)


def latest_step(run_dir: str | os.PathLike, *, timeout: float | None = None) -> int | None:
    """The newest committed step, the same on every rank; None when there is none."""
    found = steps(run_dir, timeout=timeout)
    return found[-1] if found else None


def save_step(
    run_dir: str | os.PathLike,
    step: int,
    state: MutableMapping[str, Any],
    *,
    keep_last: int | None = None,
    rng: bool = True,
    timeout: float | None = None,
) -> str:
    """Save ``state`` as ``step`` (every rank), then delete all but the ``keep_last`` newest
    committed steps (the coordinator; the new step is always kept). Returns the step's path."""
    if keep_last is not None and (type(keep_last) is not int or keep_last < 1):
        raise TorchkeepError(f"keep_last={keep_last!r}: must be a positive int or None")
    path = step_path(run_dir, step)
    if _rank() == 0:
        os.makedirs(os.fspath(run_dir), exist_ok=True)
    api.save(state, path, rng=rng, timeout=timeout)
    if keep_last is not None:
        doomed = [s for s in steps(run_dir, timeout=timeout)[:-keep_last] if s != step]
        if _rank() == 0:
            for old in doomed:
                discard_dir(step_path(run_dir, old))
        _agreed(None, timeout)  # nobody returns before the deletions are done
    return path


def restore(
    run_dir: str | os.PathLike,
    state: MutableMapping[str, Any],
    *,
    step: int | None = None,
    fallback: bool = False,
    rng: bool = True,
    timeout: float | None = None,
) -> int:
    """Restore ``step`` (default: the latest) into ``state`` on every rank; returns the step.

    With ``fallback=True`` a step that fails its checks (corrupt or malformed files) is skipped
    with a warning and the next older one is tried, on every rank alike.
    """
    found = steps(run_dir, timeout=timeout)
    candidates = [s for s in found if step is None or s == step]
    if not candidates:
        what = f"step {step}" if step is not None else "no committed step"
        raise CheckpointNotFoundError(f"{os.fspath(run_dir)}: {what} found")
    if step is not None or not fallback:
        candidates = candidates[-1:]
    for current in reversed(candidates):
        try:
            api.load(state, step_path(run_dir, current), rng=rng, timeout=timeout)
            return current
        except (CorruptionError, FormatError) as exc:
            if current == candidates[0]:
                raise
            warnings.warn(
                f"step {current} could not be restored ({exc}); trying the previous step",
                stacklevel=2,
            )
    raise AssertionError("unreachable")


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
