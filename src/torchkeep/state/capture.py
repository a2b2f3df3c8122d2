"""Capture a training state dict into one saveable tree, and restore it in place.

A *training state* is a plain dict such as ``{"model": model, "optimizer": opt, "epoch": 3}``.
Values with ``state_dict()``/``load_state_dict()`` (modules, optimizers, schedulers, scalers,
stateful data loaders, user objects) are captured through ``state_dict()`` and restored in
place; every other value is saved as is and written back into the dict. RNG state rides along.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, MutableMapping
from typing import Any

import torch
from torch import nn

from ..errors import StateDictMismatchError, TorchkeepError
from .loader import capture_generators, is_stateful_loader, settle
from .module import _check as check_report
from .module import _plan as plan_load
from .module import load_state_dict as load_module
from .report import LoadReport
from .rng import PreparedRng, capture_rng, prepare_rng

FORMAT = "torchkeep.training-state/1"
#: Optimizer state entries that always have their parameter's shape (checked on restore).
PARAM_SHAPED = {
    "exp_avg",
    "exp_avg_sq",
    "max_exp_avg_sq",
    "momentum_buffer",
    "square_avg",
    "acc_delta",
    "sum",
    "grad_avg",
}


def is_stateful(value: Any) -> bool:
    """True for objects restored in place through ``state_dict()``/``load_state_dict()``."""
    return (
        not isinstance(value, type)
        and callable(getattr(value, "state_dict", None))
        and callable(getattr(value, "load_state_dict", None))
    )


def capture(state: MutableMapping[str, Any], *, rng: bool = True) -> dict[str, Any]:
    """One tree holding every entry of ``state`` (and the RNG state unless ``rng=False``)."""
    if not isinstance(state, MutableMapping):
        raise TorchkeepError(
            f"the training state must be a dict of name -> object, not {type(state).__name__}"
        )
    objects: dict[str, Any] = {}
    values: dict[str, Any] = {}
    loaders: dict[str, Any] = {}
    for name, value in state.items():
        if not isinstance(name, str):
            raise TorchkeepError(f"training state key {name!r}: keys must be strings")
        if is_stateful(value):
            objects[name] = value.state_dict()
            if is_stateful_loader(value):
                loaders[name] = capture_generators(value)
        else:
            values[name] = value
    tree: dict[str, Any] = {"format": FORMAT, "objects": objects, "values": values}
    if loaders:
        tree["loaders"] = loaders
    if rng:
        tree["rng"] = capture_rng()
    return tree


#: Loads the saved state of module ``state[name]`` into it (strictly) and returns the report.
ModuleLoader = Callable[[str, nn.Module], LoadReport]


def restore(
    tree: Any,
    state: MutableMapping[str, Any],
    *,
    rng: bool = True,
    source: str = "checkpoint",
    load_module: ModuleLoader | None = None,
) -> None:
    """Load ``tree`` (from :func:`capture`) into ``state``: objects in place, values written back.

    All or nothing: every key, shape, loader state and the RNG state is checked before anything
    changes, and objects that reject their state are rolled back; modules load strictly (a
    mismatch names the offending tensor and leaves the module untouched). A checkpoint without
    RNG state restores everything else, with a warning. ``load_module`` replaces copying a
    module's tensors from ``tree`` (there only their shapes are then needed): the file-backed
    restore reads them straight into the parameters instead.
    """
    objects, values = _check_tree(tree, source)
    _check_keys(objects, values, state, source)
    for name in objects:  # shapes of modules and optimizers, before anything is modified
        _precheck(name, state[name], objects[name], source)
    loaders = _check_loaders(tree, source)
    prepared_rng = _prepare_rng(tree, rng, source)
    # Everything that can be checked has been; now apply. Objects that are not modules go first
    # and are rolled back if one of them rejects its state; module weights were verified and
    # shape-checked above, so they go last, then the plain values and the RNG state.
    _apply_stateful(
        [n for n in objects if not isinstance(state[n], nn.Module)], objects, state, source
    )
    for name in objects:
        if isinstance(state[name], nn.Module):
            _restore_object(name, state[name], objects[name], source, load_module)
    for name in objects:
        if is_stateful_loader(state[name]):
            settle(state[name], loaders.get(name) or {})
    for name, value in values.items():
        state[name] = value
    if prepared_rng is not None:
        prepared_rng.apply()


def _prepare_rng(tree: dict, rng: bool, source: str) -> PreparedRng | None:
    """The checked RNG state to apply last, or None (skipped, or absent: then a warning)."""
    if not rng:
        return None
    if "rng" not in tree:
        warnings.warn(
            f"{source}: the checkpoint holds no RNG state (saved with rng=False); everything "
            "else was restored, the random generators were left as they are",
            stacklevel=4,
        )
        return None
    return prepare_rng(tree["rng"], f"{source}: rng")


def _check_loaders(tree: dict, source: str) -> dict[str, Any]:
    """Saved data-loader generator states, each a tensor of a generator state's size."""
    loaders = tree.get("loaders")
    if not isinstance(loaders, dict):
        return {}
    size = len(torch.Generator().get_state())
    for name, saved in loaders.items():
        for gen_name, value in saved.items() if isinstance(saved, dict) else ():
            if not isinstance(value, torch.Tensor) or value.numel() != size:
                raise StateDictMismatchError(
                    f"{source}: loaders[{name!r}].{gen_name}: not a generator state of {size} "
                    "bytes; restore a step saved by torchkeep or drop the loader from the state"
                )
    return loaders


def _apply_stateful(names: list[str], objects: dict, state: MutableMapping, source: str) -> None:
    """``load_state_dict`` each object; if one rejects its state, put the earlier ones back."""
    done: list[tuple[str, Any]] = []
    for name in names:
        target = state[name]
        before = _snapshot(target)
        try:
            _restore_object(name, target, objects[name], source, None)
        except BaseException:
            for earlier, saved in reversed(done + [(name, before)]):
                _rollback(state[earlier], saved)
            raise
        done.append((name, before))


def _snapshot(target: Any) -> Any:
    """What ``target.load_state_dict`` needs to undo a restore.

    An optimizer's ``load_state_dict`` builds new state tensors and leaves the old ones alone,
    so its current state dict (which refers to them) is enough; other objects may update what
    their state dict refers to in place, so theirs is copied.
    """
    current = target.state_dict()
    return current if isinstance(target, torch.optim.Optimizer) else copy.deepcopy(current)


def _rollback(target: Any, saved: Any) -> None:
    try:
        target.load_state_dict(saved)
    except Exception as exc:  # the original error is the one to report; say this one too
        warnings.warn(
            f"could not put {type(target).__name__} back after a failed restore: {exc}",
            stacklevel=3,
        )


def _check_tree(tree: Any, source: str) -> tuple[dict, dict]:
    ok = isinstance(tree, dict) and tree.get("format") == FORMAT
    if (
        not ok
        or not isinstance(tree.get("objects"), dict)
        or not isinstance(tree.get("values"), dict)
    ):
        raise TorchkeepError(
            f"{source}: this is not a torchkeep training checkpoint (no {FORMAT!r} tree); "
            "load it with torchkeep.load() instead"
        )
    return tree["objects"], tree["values"]


def _check_keys(objects: dict, values: dict, state: MutableMapping, source: str) -> None:
    for name, value in state.items():
        if is_stateful(value) and name not in objects:
            where = "as a plain value" if name in values else "at all"
            raise StateDictMismatchError(
                f"{source}: state[{name!r}] is a {type(value).__name__} but the checkpoint does "
                f"not hold it {where}; remove it from the state or restore a matching step"
            )
        if not is_stateful(value) and name in objects:
            raise StateDictMismatchError(
                f"{source}: the checkpoint holds a stateful object for state[{name!r}] but the "
                f"state has a plain {type(value).__name__}; pass the object to restore into"
            )
    for name in objects:
        if name not in state:
            raise StateDictMismatchError(
                f"{source}: the checkpoint holds object {name!r} that the state lacks; add "
                f"state[{name!r}] (the object to restore into) or drop it from the saved state"
            )
    for name in state:
        if name not in objects and name not in values:
            raise StateDictMismatchError(
                f"{source}: state[{name!r}] is not in the checkpoint; remove it from the state "
                "or restore a step saved with it"
            )


def _restore_object(
    name: str, target: Any, saved: Any, source: str, loader: ModuleLoader | None
) -> None:
    if isinstance(target, nn.Module):
        try:
            if loader is not None:
                loader(name, target)
            else:
                load_module(target, saved, strict=True)
        except StateDictMismatchError as exc:
            raise StateDictMismatchError(f"{source}: state[{name!r}]: {exc}", exc.report) from exc
        return
    try:
        target.load_state_dict(saved)
    except (ValueError, KeyError, TypeError, RuntimeError, IndexError) as exc:
        raise StateDictMismatchError(
            f"{source}: state[{name!r}] ({type(target).__name__}) rejected the saved state: "
            f"{exc}; the object does not match the one that was saved"
        ) from exc
    if isinstance(target, torch.optim.Optimizer):
        _state_to_param_devices(target)


def _precheck(name: str, target: Any, saved: Any, source: str) -> None:
    if isinstance(target, torch.optim.Optimizer):
        _check_optimizer(name, target, saved, source)
    elif isinstance(target, nn.Module):
        if not isinstance(saved, dict):
            raise StateDictMismatchError(f"{source}: state[{name!r}]: saved value is no state dict")
        report = LoadReport(source=f"{source}: state[{name!r}]")
        sources = {k: (tuple(v.shape), v.dtype) for k, v in saved.items() if torch.is_tensor(v)}
        plan_load(report, dict(target.state_dict(keep_vars=True)), sources)
        check_report(report, strict=True)


def _check_optimizer(name: str, opt: torch.optim.Optimizer, saved: Any, source: str) -> None:
    """Name the first parameter whose saved optimizer state does not fit (torch does not)."""
    groups = saved.get("param_groups") if isinstance(saved, dict) else None
    if not isinstance(groups, list) or len(groups) != len(opt.param_groups):
        raise StateDictMismatchError(
            f"{source}: state[{name!r}]: the checkpoint has "
            f"{len(groups) if isinstance(groups, list) else 'no'} parameter groups, the optimizer "
            f"{len(opt.param_groups)}; build the optimizer as it was when saved"
        )
    per_state = saved.get("state", {})
    for g, (live, old) in enumerate(zip(opt.param_groups, groups)):
        ids = old.get("params", [])
        if len(ids) != len(live["params"]):
            raise StateDictMismatchError(
                f"{source}: state[{name!r}].param_groups[{g}] has {len(ids)} parameters in the "
                f"checkpoint, {len(live['params'])} in the optimizer; build it as when saved"
            )
        for pid, param in zip(ids, live["params"]):
            for key, value in (per_state.get(pid) or {}).items():
                tensor = isinstance(value, torch.Tensor) and key in PARAM_SHAPED
                if tensor and tuple(value.shape) != tuple(param.shape):
                    raise StateDictMismatchError(
                        f"{source}: state[{name!r}].state[{pid}].{key} has shape "
                        f"{list(value.shape)} but its parameter has {list(param.shape)}; "
                        "the model changed since this checkpoint was saved"
                    )


def _state_to_param_devices(opt: torch.optim.Optimizer) -> None:
    """Optimizer state tensors live where their parameter lives (a classic resume bug)."""
    for group in opt.param_groups:
        for param in group["params"]:
            slot = opt.state.get(param)
            if not slot:
                continue
            for key, value in slot.items():
                movable = isinstance(value, torch.Tensor) and value.dim() > 0
                if movable and value.device != param.device:
                    slot[key] = value.to(param.device)
