"""Where loaded tensors go: into the parameters (copy) or as the parameters (``assign=True``).

Also the two facts about a model's own tensors that decide whether a load means anything: which
of its keys are the same tensor as another (tied weights: ``lm_head.weight`` is the input
embedding), and which still live on the ``meta`` device (no storage; copying into them is a
silent no-op, so that is refused unless the tensors are assigned).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import TorchkeepError


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True when two model tensors are one (same object, or same memory, shape and stride)."""
    if a is b:
        return True
    if a.device.type == "meta" or b.device.type == "meta" or a.numel() == 0:
        return False
    return (
        a.device == b.device
        and a.data_ptr() == b.data_ptr()
        and a.dtype == b.dtype
        and a.shape == b.shape
        and a.stride() == b.stride()
    )


def tie_missing(
    missing: list[str], plan: dict[str, str], targets: dict[str, torch.Tensor]
) -> tuple[list[str], list[tuple[str, str]]]:
    """Split missing keys into truly missing and (key, loaded key it is tied to)."""
    by_ptr: dict[Any, list[str]] = {}
    for tkey in plan:
        tensor = targets[tkey]
        by_ptr.setdefault(_token(tensor), []).append(tkey)
    still, tied = [], []
    for key in missing:
        tensor = targets[key]
        twin = next((k for k in by_ptr.get(_token(tensor), []) if _same(tensor, targets[k])), None)
        if twin is None:
            still.append(key)
        else:
            tied.append((key, twin))
    return still, tied


def _token(tensor: torch.Tensor) -> Any:
    if tensor.device.type == "meta" or tensor.numel() == 0:
        return ("id", id(tensor))
    return ("ptr", tensor.device, tensor.data_ptr())


def check_meta(source: str, targets: dict[str, torch.Tensor], plan: dict, assign: bool) -> None:
    """Refuse to copy into tensors on ``meta``: it would report success and load nothing."""
    if assign:
        return
    on_meta = [k for k in plan if targets[k].device.type == "meta"]
    if on_meta:
        raise TorchkeepError(
            f"{source}: the model's tensors are on the meta device ({len(on_meta)} of them, e.g. "
            f"{on_meta[0]}), which holds no data, so copying into them would load nothing. Pass "
            "assign=True to make the loaded tensors the parameters, or allocate the model first "
            "(model.to_empty(device='cpu')); nothing was loaded"
        )


def stays_on_meta(
    targets: dict[str, torch.Tensor], plan: dict, tied: list[tuple[str, str]]
) -> list[str]:
    """Keys that nothing was loaded into and that are still on ``meta`` after the load."""
    done = set(plan) | {k for k, _ in tied}
    return [k for k, t in targets.items() if k not in done and t.device.type == "meta"]


@dataclass
class Placement:
    """``assign`` and ``map_location`` of one load."""

    assign: bool = False
    map_location: Any = None

    def read_location(self, model: nn.Module) -> Any:
        """Where a ``torch.save`` file is read to before its tensors are placed.

        ``map_location`` when given; else the one device all of the model's tensors live on
        (so each tensor lands where its parameter is, whatever device the file names), or the
        CPU for a model spread over devices or on ``meta`` (each copy then moves its tensor).
        """
        if self.map_location is not None:
            return self.map_location
        devices = {t.device for t in model.state_dict(keep_vars=True).values()}
        only = devices.pop() if len(devices) == 1 else None
        return only if only is not None and only.type != "meta" else torch.device("cpu")

    def device_for(self, old: torch.Tensor) -> torch.device:
        """Device of an assigned tensor: ``map_location`` if it names one, else the old one's."""
        if isinstance(self.map_location, (str, torch.device)):
            return torch.device(self.map_location)
        return old.device if old.device.type != "meta" else torch.device("cpu")

    def assign_all(
        self,
        model: nn.Module,
        targets: dict[str, torch.Tensor],
        plan: dict[str, str],
        tied: list[tuple[str, str]],
        read: Callable[[str], torch.Tensor],
    ) -> None:
        """Make each loaded tensor the model's parameter/buffer; tied keys share the new one.

        Every tensor is read (and verified) before the first one is put in place, so a corrupt
        file leaves the model as it was.
        """
        slots = {tkey: _slot(model, tkey) for tkey in [*plan, *(k for k, _ in tied)]}
        made: dict[int, torch.Tensor] = {}
        for tkey, skey in plan.items():
            old = targets[tkey]
            if id(old) not in made:
                made[id(old)] = self._new(old, read(skey))
        for tkey in plan:
            _put(*slots[tkey], made[id(targets[tkey])])
        for key, twin in tied:
            _put(*slots[key], made[id(targets[twin])])

    def _new(self, old: torch.Tensor, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.detach().to(device=self.device_for(old), dtype=old.dtype)
        if isinstance(old, nn.Parameter):
            return nn.Parameter(tensor, requires_grad=old.requires_grad)
        return tensor


def _slot(model: nn.Module, key: str) -> tuple[dict, str]:
    """The ``_parameters``/``_buffers`` dict holding ``key``, and the name in it."""
    owner, _, name = key.rpartition(".")
    try:
        module = model.get_submodule(owner) if owner else model
    except AttributeError:
        module = None
    for table in (getattr(module, "_parameters", {}), getattr(module, "_buffers", {})):
        if name in table and table[name] is not None:
            return table, name
    raise TorchkeepError(
        f"cannot assign {key}: it is not a parameter or buffer of the model (a module's own "
        "state-dict hook makes it); load without assign=True"
    )


def _put(table: dict, name: str, tensor: torch.Tensor) -> None:
    table[name] = tensor
