"""Saves the fault suites interrupt, and the checks that every interrupted state must pass.

A *version* ``v`` is a deterministic object; a save writes version ``v`` over version ``v-1``.
After any fault the target must hold some complete committed version (never a mix, never a
partial file), and committed manager steps must each load, verify and match their number.
"""

from __future__ import annotations

import os
from typing import Any

import torch

import torchkeep
from torchkeep.manager import CheckpointManager
from torchkeep.storage.run_dir import STATE_FILE, list_steps

KINDS = ("file", "step", "bare_step", "async", "incremental")
#: Kinds whose target is a run directory: ``step`` applies retention (keep_last=2),
#: ``bare_step`` none, so only the commit's own parent-directory fsync makes a step durable.
#: "incremental" saves every version through one manager
#: per target with ``incremental=True``, with a frozen module whose bytes later steps take from
#: the first step that wrote them (references; retention must keep that step).
STEP_KINDS = ("step", "bare_step", "incremental")
_MANAGERS: dict[str, tuple[CheckpointManager, torch.nn.Module]] = {}


def frozen_module() -> torch.nn.Module:
    """The frozen part of an incremental state: the same bytes in every version."""
    torch.manual_seed(5)
    module = torch.nn.Linear(64, 40)
    module.requires_grad_(False)
    return module


def _incremental_save(target: str, version: int, obj: dict) -> None:
    if target not in _MANAGERS:
        manager = CheckpointManager(target, rng=False, keep_last=2, incremental=True)
        _MANAGERS[target] = (manager, frozen_module())
    manager, frozen = _MANAGERS[target]
    manager.save(version, {"weights": obj, "frozen": frozen})


def is_step(kind: str) -> bool:
    """True when ``kind`` saves manager steps into a run directory."""
    return kind in STEP_KINDS


def make_state(version: int, scale: int = 1) -> dict[str, Any]:
    """Version ``version`` of a small checkpoint dict (a few tensors spanning several 4 KiB)."""
    gen = torch.Generator().manual_seed(version)
    return {
        "w": torch.randn(48 * scale, 64, generator=gen),
        "b": torch.arange(100, dtype=torch.int64) + version,
        "nested": {"h": torch.full((7, 5), float(version), dtype=torch.float16), "v": version},
        "version": version,
    }


def same(a: Any, b: Any) -> bool:
    """Exact structural and bitwise equality of two checkpoint objects."""
    if isinstance(a, torch.Tensor):
        return (
            isinstance(b, torch.Tensor)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and torch.equal(a, b)
        )
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


def save_version(kind: str, target: str, version: int, scale: int = 1) -> None:
    """Save version ``version`` to ``target`` (a file, or a run directory for steps)."""
    obj = make_state(version, scale)
    if kind == "file":
        torchkeep.save(obj, target)
    elif kind == "async":
        torchkeep.save_async(obj, target).wait()
    elif kind == "incremental":
        _incremental_save(target, version, obj)
    elif is_step(kind):
        keep_last = 2 if kind == "step" else None
        with CheckpointManager(target, rng=False, keep_last=keep_last) as manager:
            manager.save(version, {"weights": obj})
    else:
        raise ValueError(kind)


def file_version(path: str, scale: int = 1) -> int:
    """The version stored at ``path``; raises AssertionError if it is not a complete version."""
    loaded = torchkeep.load(path)
    version = loaded.get("version") if isinstance(loaded, dict) else None
    if not isinstance(version, int) or not same(loaded, make_state(version, scale)):
        raise AssertionError(f"{path}: content is not a complete saved version")
    if torchkeep.verify(path):
        raise AssertionError(f"{path}: verify() reports corrupt tensors")
    return version


def step_versions(run_dir: str, scale: int = 1) -> list[int]:
    """Committed steps of ``run_dir``; each must load completely as its own version."""
    found = []
    for info in list_steps(run_dir):
        loaded = torchkeep.load(os.path.join(info.path, STATE_FILE))
        if not same(loaded["values"]["weights"], make_state(info.step, scale)):
            raise AssertionError(f"{info.path}: step content is not version {info.step}")
        frozen = loaded["objects"].get("frozen")
        if frozen is not None and not same(frozen, frozen_module().state_dict()):
            raise AssertionError(f"{info.path}: the frozen module's bytes are not the saved ones")
        found.append(info.step)
    return found


def committed(kind: str, target: str, scale: int = 1) -> list[int]:
    """Versions visible at ``target``: ``[v]`` for a file (``[]`` if absent), steps for a run."""
    if is_step(kind):
        return step_versions(target, scale)
    if not os.path.exists(target):
        return []
    return [file_version(target, scale)]


def check_after_fault(kind: str, target: str, old: int, new: int, scale: int = 1) -> list[int]:
    """Assert the state after an interrupted save of ``new`` over ``old``; returns what is seen."""
    seen = committed(kind, target, scale)
    if is_step(kind):
        # Retention interrupted by the fault may leave extra older steps; never newer ones.
        if old not in seen or max(seen) > new:
            raise AssertionError(f"{target}: steps {seen} after a fault (old {old}, new {new})")
    elif seen not in ([old], [new]):
        raise AssertionError(f"{target}: holds {seen}, expected old {old} or new {new}")
    return seen
