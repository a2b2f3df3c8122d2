"""Retention: pure keep/delete policies over committed steps, and the prune that applies them.

Policies combine by union: a step is kept if any policy keeps it. The newest step is always
kept, and so is the best one whenever a ``monitor`` is named. ``prune`` deletes the rest, each
step renamed to a temporary (trash) name first so a crash mid-deletion never leaves a partial
step visible; leftovers are swept later like any other temporary.
"""

from __future__ import annotations

import math
import os
from collections.abc import Collection, Sequence
from typing import TypedDict

from .errors import TorchkeepError
from .storage.backend import LOCAL, Backend
from .storage.lock import DirLock
from .storage.references import referenced_steps
from .storage.run_dir import StepInfo, delete_step, list_steps

MODES = ("min", "max")


class Policy(TypedDict):
    """A manager's retention policy, as passed to :func:`prune` and :func:`kept_reasons`."""

    keep_last: int | None
    keep_best: int | None
    monitor: str | None
    mode: str
    keep_every: int | None


def _positive(name: str, value: int | None) -> None:
    if value is not None and (type(value) is not int or value < 1):
        raise TorchkeepError(f"{name}={value!r}: must be a positive int or None")


def validate_policy(
    keep_last: int | None = None,
    keep_best: int | None = None,
    monitor: str | None = None,
    mode: str = "min",
    keep_every: int | None = None,
) -> None:
    """Raise :class:`TorchkeepError` for a policy that cannot be applied."""
    for name, value in (
        ("keep_last", keep_last),
        ("keep_best", keep_best),
        ("keep_every", keep_every),
    ):
        _positive(name, value)
    if keep_best is not None and not monitor:
        raise TorchkeepError("keep_best needs monitor=<metric name> (e.g. monitor='val_loss')")
    if mode not in MODES:
        raise TorchkeepError(f"mode={mode!r}: must be 'min' or 'max'")


def keep_last(steps: Sequence[StepInfo], n: int) -> set[int]:
    """The ``n`` newest steps."""
    return {s.step for s in sorted(steps, key=lambda s: s.step)[-n:]} if n > 0 else set()


def metric_value(info: StepInfo, monitor: str) -> float | None:
    """The step's finite numeric value of ``monitor``, else None (never 'best')."""
    value = info.metrics.get(monitor)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def keep_best(steps: Sequence[StepInfo], n: int, monitor: str, mode: str = "min") -> set[int]:
    """The ``n`` steps with the best ``monitor`` value; ties favour the newer step."""
    values = [(metric_value(s, monitor), s.step) for s in steps]
    scored = [(v, step) for v, step in values if v is not None]
    sign = 1.0 if mode == "min" else -1.0
    scored.sort(key=lambda item: (sign * item[0], -item[1]))
    return {step for _, step in scored[:n]}


def keep_every(steps: Sequence[StepInfo], n: int) -> set[int]:
    """Steps that are multiples of ``n``."""
    return {s.step for s in steps if s.step % n == 0}


def kept_reasons(
    steps: Sequence[StepInfo],
    *,
    keep_last: int | None = None,
    keep_best: int | None = None,
    monitor: str | None = None,
    mode: str = "min",
    keep_every: int | None = None,
) -> dict[int, list[str]]:
    """step -> reasons it is kept ("last", "best", "every"); absent steps may be deleted.

    With no policy at all every step is kept (reason "all"). The newest step is always kept
    ("last") and, when ``monitor`` is set, the best one ("best", ``keep_best`` defaults to 1).
    """
    validate_policy(keep_last, keep_best, monitor, mode, keep_every)
    if not steps:
        return {}
    if keep_last is None and keep_best is None and keep_every is None and not monitor:
        return {s.step: ["all"] for s in steps}
    reasons: dict[int, list[str]] = {}

    def add(kept: set[int], why: str) -> None:
        for step in sorted(kept):
            reasons.setdefault(step, []).append(why)

    add(_keep_last(steps, keep_last or 1), "last")
    if monitor:
        add(_keep_best(steps, keep_best or 1, monitor, mode), "best")
    if keep_every is not None:
        add(_keep_every(steps, keep_every), "every")
    return dict(sorted(reasons.items()))


_keep_last, _keep_best, _keep_every = keep_last, keep_best, keep_every


def with_referenced(
    steps: Sequence[StepInfo], reasons: dict[int, list[str]]
) -> dict[int, list[str]]:
    """``reasons`` plus every step whose bytes a kept step uses (incremental steps refer to
    an earlier step's file; that step is kept, reason "referenced by N", until nothing kept
    refers to it). References point at the step holding the bytes, so one pass suffices."""
    out = {step: list(why) for step, why in reasons.items()}
    present = {s.step for s in steps}
    for info in steps:
        if info.step not in reasons:
            continue
        for target in sorted(referenced_steps(info.path)):
            if target in present and target != info.step:
                out.setdefault(target, []).append(f"referenced by {info.step}")
    return dict(sorted(out.items()))


def prune(
    directory: str | os.PathLike[str],
    *,
    keep_last: int | None = None,
    keep_best: int | None = None,
    monitor: str | None = None,
    mode: str = "min",
    keep_every: int | None = None,
    dry_run: bool = False,
    lock: bool = True,
    backend: Backend | None = None,
    protect: Collection[int] = (),
) -> list[int]:
    """Delete the committed steps no policy keeps; returns their numbers (sorted).

    ``dry_run`` only reports. ``lock`` takes the directory's writer lock (raising
    :class:`torchkeep.LockError` while a training run writes there); the manager, which
    already holds it, passes ``lock=False``. ``backend`` is the store of ``directory`` (the
    local disk by default; object stores have no lock). ``protect`` lists steps kept whatever
    the policy (a two-tier manager's local steps not yet replicated).
    """
    directory = os.fspath(directory)
    store = LOCAL if backend is None else backend
    holder = DirLock(directory)
    if lock and not dry_run and store is LOCAL:
        holder.acquire()
    try:
        steps = list_steps(directory, store)
        reasons = kept_reasons(
            steps,
            keep_last=keep_last,
            keep_best=keep_best,
            monitor=monitor,
            mode=mode,
            keep_every=keep_every,
        )
        reasons = with_referenced(steps, reasons)
        doomed = [s.step for s in steps if s.step not in reasons and s.step not in protect]
        if not dry_run:
            for step in doomed:
                delete_step(directory, step, store)
    finally:
        holder.release()
    return doomed
