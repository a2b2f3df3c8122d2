"""Turn a training state (``{"model": m, "optim": o, "loader": l, "epoch": 3}``) into what a
sharded save needs, and put a loaded one back.

Modules and optimizers go through DCP's ``get_state_dict``/``set_state_dict`` family, which
knows the key rules of DDP, FSDP2, tensor parallel and ``torch.compile``; their tensors become
DCP items (sharded, deduplicated, reshardable). Other stateful objects (schedulers, scalers)
and plain values are replicated on every rank: each is stored as one non-tensor value in the
typed tree. Data loaders and the RNG differ per rank: they form the *rank state*, kept in each
rank's own file and restored only to the same rank at the same world size.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from ..errors import StateDictMismatchError, TorchkeepError
from ..state.capture import is_stateful
from ..state.loader import capture_generators, is_stateful_loader, settle
from ..state.rng import capture_rng, restore_rng

MODULES, OPTIMIZERS, OBJECTS, VALUES = "modules", "optimizers", "objects", "values"


@dataclass
class Parts:
    """A training state sorted by how each entry is saved."""

    modules: dict[str, nn.Module] = field(default_factory=dict)
    optimizers: dict[str, torch.optim.Optimizer] = field(default_factory=dict)
    owners: dict[str, nn.Module] = field(default_factory=dict)  # optimizer name -> its module
    loaders: dict[str, Any] = field(default_factory=dict)
    objects: dict[str, Any] = field(default_factory=dict)
    values: dict[str, Any] = field(default_factory=dict)


def split(state: MutableMapping[str, Any]) -> Parts:
    """Sort ``state``'s entries; every optimizer must belong to one module of the state."""
    if not isinstance(state, MutableMapping):
        raise TorchkeepError(
            f"the training state must be a dict of name -> object, not {type(state).__name__}"
        )
    parts = Parts()
    for name, value in state.items():
        if not isinstance(name, str):
            raise TorchkeepError(f"training state key {name!r}: keys must be strings")
        if isinstance(value, nn.Module):
            parts.modules[name] = value
        elif isinstance(value, torch.optim.Optimizer):
            parts.optimizers[name] = value
        elif is_stateful_loader(value):
            parts.loaders[name] = value
        elif is_stateful(value):
            parts.objects[name] = value
        else:
            parts.values[name] = value
    for name, opt in parts.optimizers.items():
        parts.owners[name] = _owner(name, opt, parts.modules)
    return parts


def _owner(name: str, opt: torch.optim.Optimizer, modules: dict[str, nn.Module]) -> nn.Module:
    params = {id(p) for group in opt.param_groups for p in group["params"]}
    for module in modules.values():
        if any(id(p) in params for p in module.parameters()):
            return module
    raise TorchkeepError(
        f"training state {name!r}: the optimizer's parameters belong to no module of the state; "
        "add the model to the state so its sharding is known"
    )


def dcp_state(parts: Parts) -> dict[str, Any]:
    """The dict handed to DCP. Objects' and values' states are wrapped in a 1-tuple, which DCP
    treats as one opaque value (it flattens dicts), so each is stored and restored whole."""
    return {
        MODULES: {n: get_model_state_dict(m) for n, m in parts.modules.items()},
        OPTIMIZERS: {
            n: get_optimizer_state_dict(parts.owners[n], o) for n, o in parts.optimizers.items()
        },
        OBJECTS: {n: (o.state_dict(),) for n, o in parts.objects.items()},
        VALUES: (dict(parts.values),),
    }


def rank_state(parts: Parts, rng: bool) -> dict[str, Any]:
    """This rank's own state: its RNG streams and its data loaders' positions."""
    loaders = {
        n: {"state": loader.state_dict(), "generators": capture_generators(loader)}
        for n, loader in parts.loaders.items()
    }
    return {"rng": capture_rng() if rng else None, "loaders": loaders}


def apply(
    parts: Parts, loaded: dict[str, Any], state: MutableMapping[str, Any], where: str
) -> None:
    """Put a loaded :func:`dcp_state` back into the live objects and ``state``."""
    for n, module in parts.modules.items():
        set_model_state_dict(module, loaded[MODULES][n])
    for n, opt in parts.optimizers.items():
        set_optimizer_state_dict(parts.owners[n], opt, loaded[OPTIMIZERS][n])
    for n, obj in parts.objects.items():
        obj.load_state_dict(_unwrap(loaded[OBJECTS][n], f"{where}: objects.{n}"))
    values = _unwrap(loaded[VALUES], f"{where}: values")
    if not isinstance(values, dict):
        raise StateDictMismatchError(f"{where}: the saved plain values are not a dict")
    missing = sorted(set(parts.values) - set(values))
    if missing:
        raise StateDictMismatchError(
            f"{where}: the checkpoint holds no value for {missing}; remove these keys from the "
            "state or save them first"
        )
    for n in parts.values:
        state[n] = values[n]


def _unwrap(value: Any, where: str) -> Any:
    if not (isinstance(value, tuple) and len(value) == 1):
        raise StateDictMismatchError(f"{where}: was not saved by torchkeep.distributed.save")
    return value[0]


def restore_rank_state(parts: Parts, saved: Any, rng: bool, where: str) -> None:
    """Restore this rank's RNG and loaders from what the same rank saved."""
    if not isinstance(saved, dict):
        raise StateDictMismatchError(f"{where}: the rank state is malformed")
    raw_loaders = saved.get("loaders")
    loaders = raw_loaders if isinstance(raw_loaders, dict) else {}
    for n, loader in parts.loaders.items():
        entry = loaders.get(n)
        if not isinstance(entry, dict) or "state" not in entry:
            raise StateDictMismatchError(f"{where}: no saved state for data loader {n!r}")
        loader.load_state_dict(entry["state"])
        settle(loader, entry.get("generators") or {})
    if rng:
        if saved.get("rng") is None:
            raise StateDictMismatchError(
                f"{where}: the checkpoint holds no RNG state (saved with rng=False); pass "
                "rng=False to restore without it"
            )
        restore_rng(saved["rng"], f"{where}: rng")
