"""Checks of the arguments users pass to the load entry points, done before any file is read.

A bad argument is the caller's mistake, not the file's: it raises ``TypeError``/``ValueError``
naming the argument, never a format error. ``map_location`` follows ``torch.load``: ``None``, a
device (string or ``torch.device``), a dict ``{saved: target}``, or a callable
``fn(storage, location)`` returning a storage on the target device (or ``None`` to keep the
saved location).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

MapLocation = Any  # None | str | torch.device | dict[str, str | torch.device] | callable


def _device(value: Any, what: str) -> torch.device:
    if not isinstance(value, (str, torch.device)):
        raise TypeError(
            f"{what} must be a device string or torch.device, not {type(value).__name__}"
        )
    try:
        return torch.device(value)
    except (RuntimeError, ValueError) as exc:
        raise ValueError(f"{what}: {value!r} is not a device ({exc})") from None


def check_map_location(map_location: MapLocation) -> MapLocation:
    """``map_location`` unchanged if it is one of the accepted kinds, else TypeError/ValueError."""
    if map_location is None or callable(map_location):
        return map_location
    if isinstance(map_location, (str, torch.device)):
        _device(map_location, "map_location")
        return map_location
    if isinstance(map_location, dict):
        for saved, target in map_location.items():
            if not isinstance(saved, str):
                raise TypeError(f"map_location keys must be device strings, not {saved!r}")
            _device(target, f"map_location[{saved!r}]")
        return map_location
    raise TypeError(
        "map_location must be None, a device ('cpu', 'cuda:0', torch.device), a dict "
        f"{{saved: target}} or a callable (storage, location) -> storage; got "
        f"{type(map_location).__name__} {map_location!r:.60}"
    )


def resolve_callable(fn: Callable, saved: Iterable[str]) -> dict[str, str]:
    """A callable ``map_location`` as a dict ``{saved location: target device}``.

    The callable is asked once per saved location with an empty CPU storage, the way
    ``torch.load`` asks it per storage; the device of what it returns is where tensors saved
    there go (``None`` keeps the saved location).
    """
    table = {}
    for location in sorted(set(saved)):
        result = fn(torch.UntypedStorage(0), location)
        if result is None:
            table[location] = location
        elif isinstance(result, (torch.UntypedStorage, torch.TypedStorage, torch.Tensor)):
            table[location] = str(result.device)
        else:
            raise TypeError(
                f"map_location callable returned {type(result).__name__} for {location!r}; "
                "it must return a storage (or None to keep the saved location)"
            )
    return table


def check_flag(value: Any, name: str) -> bool:
    """A boolean argument, refusing other types (``strict="no"`` is a mistake, not True)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, not {value!r:.40}")
    return value
