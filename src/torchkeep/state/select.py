"""Find the state dict inside a checkpoint: ``key=`` paths, wrapper entries, ``prefix=`` stripping.

A path such as ``"state_dict.net"`` is followed through nested dicts and through flat dotted keys
alike, so a Lightning checkpoint (``{"state_dict": {"net.0.weight": ...}}``) and its conversion to
flat safetensors (``{"state_dict.net.0.weight": ...}``) select the same tensors.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

from ..errors import TorchkeepError

#: Sub-dicts of a checkpoint dict that hold the model's weights, tried in this order.
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model_state", "model")

Test = Callable[[Any], bool]


@dataclass(frozen=True)
class Kinds:
    """How to tell tensors (``is_leaf``) and navigable dicts (``is_map``) apart in a tree."""

    is_leaf: Test
    is_map: Test


def _under(tree: dict, path: str) -> dict:
    """The entries of ``tree`` whose keys start with ``path.``, with that part removed."""
    cut = len(path) + 1
    return _like(tree, ((k[cut:], v) for k, v in tree.items() if _starts(k, path + ".")))


def _starts(key: Any, prefix: str) -> bool:
    return isinstance(key, str) and key.startswith(prefix)


def _like(tree: Any, items: Any) -> dict:
    """A dict of ``items`` of the same dict class as ``tree`` (so it navigates the same way)."""
    return type(tree)(items) if isinstance(tree, dict) else dict(items)


def descend(tree: Any, path: str, kinds: Kinds) -> Any:
    """The value at dotted ``path``: nested dict keys, dotted keys, or a flat prefix; else None."""
    if not kinds.is_map(tree):
        return None
    if path in tree:
        return tree[path]
    for key, value in tree.items():
        if isinstance(key, str) and path.startswith(key + ".") and kinds.is_map(value):
            found = descend(value, path[len(key) + 1 :], kinds)
            if found is not None:
                return found
    return _under(tree, path) or None


def _sample(tree: Any, kinds: Kinds) -> str:
    if not kinds.is_map(tree):
        return "the checkpoint is not a dict"
    keys = [str(k) for k in list(tree)[:5]]
    more = f", ... ({len(tree)} in all)" if len(tree) > 5 else ""
    return f"its top-level keys are {', '.join(keys) or 'none'}{more}"


def by_key(tree: Any, key: str | tuple[str, ...], kinds: Kinds, name: str) -> Any:
    """The sub-dict at ``key`` (a dotted string, or exact parts from internal callers)."""
    if isinstance(key, tuple):
        found: Any = tree
        for part in key:
            found = found.get(part) if kinds.is_map(found) else None
    else:
        found = descend(tree, key, kinds) if key else None
    if found is None:
        raise TorchkeepError(
            f"{name}: no entry {key!r} in the checkpoint ({_sample(tree, kinds)}); "
            "pass the dotted path of the sub-dict holding the weights, e.g. key='state_dict'"
        )
    return found


def auto_unwrap(tree: Any, kinds: Kinds, target_keys: Collection[str]) -> tuple[Any, str | None]:
    """A checkpoint dict's weights entry (``state_dict``, ``model``...), nested or flat."""
    if not kinds.is_map(tree) or not tree:
        return tree, None
    if not all(kinds.is_leaf(v) for v in tree.values()):
        for candidate in WRAPPER_KEYS:
            value = tree.get(candidate)
            if kinds.is_map(value):
                return value, f"used the checkpoint's '{candidate}' entry"
        return tree, None
    if any(k in tree for k in target_keys):
        return tree, None  # a flat state dict that already names the model's tensors
    for candidate in WRAPPER_KEYS:
        if any(_starts(k, candidate + ".") for k in target_keys):
            continue  # the model has a submodule of that name: not a wrapper
        flat = _under(tree, candidate)
        if flat:
            return flat, f"used the checkpoint's '{candidate}.' keys"
    return tree, None


def strip_prefix(tree: dict, prefix: str, name: str) -> tuple[dict, str]:
    """Only the keys starting with ``prefix``, with it removed."""
    if not isinstance(prefix, str) or not prefix:
        raise ValueError(f"prefix must be a non-empty string such as 'net.', not {prefix!r}")
    kept = _like(tree, ((k[len(prefix) :], v) for k, v in tree.items() if _starts(k, prefix)))
    if not kept:
        shown = ", ".join(str(k) for k in list(tree)[:3])
        raise TorchkeepError(
            f"{name}: no key starts with prefix {prefix!r} (keys look like {shown}); "
            "check the prefix, including its trailing dot"
        )
    note = f"kept the {len(kept)} keys under prefix '{prefix}' and removed it"
    return kept, note + (
        f" ({len(tree) - len(kept)} other keys ignored)" if len(kept) < len(tree) else ""
    )


def select(
    tree: Any,
    *,
    key: str | tuple[str, ...] | None,
    prefix: str | None,
    kinds: Kinds,
    name: str,
    target_keys: Collection[str],
) -> tuple[dict, list[str]]:
    """The mapping of tensors to load and notes saying how it was found."""
    notes: list[str] = []
    if key is not None:
        tree = by_key(tree, key, kinds, name)
    elif prefix is None:
        tree, note = auto_unwrap(tree, kinds, target_keys)
        notes += [note] if note else []
    if not kinds.is_map(tree):
        raise TorchkeepError(f"{name}: expected a state dict (a mapping of tensors)")
    if prefix is not None:
        tree, note = strip_prefix(tree, prefix, name)
        notes.append(note)
    return {k: v for k, v in tree.items() if kinds.is_leaf(v)}, notes
