"""Load a state dict into a live module in place, explaining every mismatch.

Tensors from a torchkeep/safetensors file are read straight into the module's existing
parameters and buffers (``readinto`` their memory, checksummed on the way), so the checkpoint
never exists twice in memory. With ``strict=True`` nothing is modified unless every key fits.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..engine import load
from ..errors import CorruptionError, FormatError, StateDictMismatchError, TorchkeepError
from ..format.dtypes import SAFETENSORS_TO_TORCH, dtype_from_name
from ..format.tree import TAG
from ..readers import detect
from ..storage.urls import is_url
from ..transfer.gcpause import paused_gc
from ..transfer.reader import FileReader, int_list, materialize
from .keys import match_keys
from .report import LoadReport

#: Sub-dicts of a checkpoint dict that hold the model's weights, tried in this order.
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model_state", "model")


def load_state_dict(
    model: nn.Module,
    source: str | os.PathLike | Mapping[str, Any],
    *,
    strict: bool = True,
    verify: bool = True,
    key: str | None = None,
    storage_options: dict | None = None,
) -> LoadReport:
    """Load ``source`` (a path or a mapping) into ``model`` in place and return a report.

    ``key`` picks a sub-dict of a checkpoint dict (e.g. ``"model_state"``); when omitted, a flat
    state dict is used as is and a dict holding one of ``state_dict``/``model_state_dict``/
    ``model_state``/``model`` is unwrapped. ``module.``/``_orig_mod.`` prefixes are normalized.
    With ``strict=True`` a mismatch raises :class:`StateDictMismatchError` before any change.
    """
    if isinstance(source, Mapping):
        return _load_mapping(model, source, strict=strict, key=key)
    path = os.fspath(source)
    if is_url(path):  # torchkeep/safetensors objects: ranged reads straight into the model
        with FileReader(path, storage_options) as reader:
            return _load_file(model, reader, strict=strict, verify=verify, key=key)
    if detect.sniff(path) != detect.SAFETENSORS:
        return _load_mapping(model, load(path, verify=verify), strict=strict, key=key, name=path)
    with FileReader(path) as reader:
        return _load_file(model, reader, strict=strict, verify=verify, key=key)


def _targets(model: nn.Module) -> dict[str, torch.Tensor]:
    return dict(model.state_dict(keep_vars=True))


def load_from_reader(
    model: nn.Module, reader: FileReader, parts: tuple[str, ...], *, strict: bool, verify: bool
) -> LoadReport:
    """Read the state dict at ``parts`` of an open torchkeep file straight into ``model``.

    ``parts`` is the path of dict keys to the state dict (``("objects", "model")``), given as
    parts so that keys containing dots stay unambiguous. Used to restore training checkpoints
    without materializing a second copy of the weights.
    """
    return _load_file(model, reader, strict=strict, verify=verify, key=parts)


def _unwrap(
    tree: Any, key: str | tuple[str, ...] | None, is_leaf: Any, name: str
) -> tuple[Any, str | None]:
    """Find the sub-dict holding the weights; returns (sub-dict, note)."""
    if key is not None:
        for part in key.split(".") if isinstance(key, str) else key:
            if not isinstance(tree, dict) or part not in tree:
                raise TorchkeepError(f"{name}: no entry {key!r} in the checkpoint")
            tree = tree[part]
        return tree, None
    if isinstance(tree, dict) and tree and not all(is_leaf(v) for v in tree.values()):
        for candidate in WRAPPER_KEYS:
            value = tree.get(candidate)
            if isinstance(value, dict) and not is_leaf(value):  # a tensor node is a dict too
                return value, f"used the checkpoint's '{candidate}' entry"
    return tree, None


def _check(report: LoadReport, strict: bool) -> None:
    if strict and not report.ok:
        raise StateDictMismatchError(
            f"state dict from {report.source} does not fit the model "
            f"({len(report.missing)} missing, {len(report.unexpected)} unexpected, "
            f"{len(report.shape_mismatches)} shape mismatches); nothing was loaded. "
            "Fix the model or pass strict=False to load what fits:\n" + report.table(),
            report,
        )


def _plan(
    report: LoadReport, targets: dict[str, torch.Tensor], sources: dict[str, tuple]
) -> dict[str, str]:
    """Fill the report; returns target key -> source key for the tensors that will load."""
    mapping, notes = match_keys(list(sources), list(targets))
    report.notes.extend(notes)
    used = set(mapping.values())
    report.missing = [k for k in targets if k not in mapping]
    report.unexpected = [k for k in sources if k not in used]
    plan = {}
    for tkey, skey in mapping.items():
        shape, dtype = sources[skey]
        target = targets[tkey]
        if tuple(shape) != tuple(target.shape):
            report.shape_mismatches.append((tkey, tuple(shape), tuple(target.shape)))
            continue
        if dtype != target.dtype:
            report.dtype_changes.append((tkey, str(dtype), str(target.dtype)))
        plan[tkey] = skey
    return plan


def _load_mapping(
    model: nn.Module, state: Any, *, strict: bool, key: str | None, name: str = "<mapping>"
) -> LoadReport:
    state, note = _unwrap(state, key, lambda v: isinstance(v, torch.Tensor), name)
    if not isinstance(state, Mapping):
        raise TorchkeepError(f"{name}: expected a state dict (a mapping of tensors)")
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    report = LoadReport(source=name, notes=[note] if note else [])
    targets = _targets(model)
    plan = _plan(report, targets, {k: (tuple(v.shape), v.dtype) for k, v in tensors.items()})
    _check(report, strict)
    with torch.no_grad():
        for tkey, skey in plan.items():
            targets[tkey].copy_(tensors[skey])
            report.loaded.append(tkey)
    return report


def _file_sources(
    reader: FileReader, key: str | tuple[str, ...] | None
) -> tuple[dict[str, dict], str | None]:
    """Map state-dict key -> tensor node, by walking the typed tree (no tensor is read)."""
    tree = reader.tree

    def is_leaf(node: Any) -> bool:
        return isinstance(node, dict) and node.get(TAG) == "tensor"

    plain = _node_to_plain(tree)
    sub, note = _unwrap(plain, key, is_leaf, reader.path)
    if not isinstance(sub, _Mapping):  # a value, or a node's own JSON fields: not a state dict
        raise TorchkeepError(f"{reader.path}: expected a state dict (a mapping of tensors)")
    return {k: v for k, v in sub.items() if is_leaf(v)}, note


class _Mapping(dict):
    """A dict node of the file turned into a dict; any other dict met in the tree is a node."""


def _node_to_plain(node: Any) -> Any:
    """Turn string-keyed dict nodes into dicts (tensor nodes stay nodes) for navigation."""
    if isinstance(node, dict) and node.get(TAG) == "dict" and isinstance(node.get("v"), dict):
        return _Mapping((k, _node_to_plain(v)) for k, v in node["v"].items())
    return node


def _node_shape_dtype(reader: FileReader, node: dict, path: str) -> tuple[tuple, torch.dtype]:
    """The shape and dtype a tensor node loads as, from the header alone (nothing is read)."""
    try:
        info = reader.entry(node["key"])
        dtype = _node_dtype(reader, node)
        if "view" in node:
            view = node["view"]
            shape = view.get("shape") if isinstance(view, dict) else None
            return tuple(int_list(shape, "view shape")), dtype
        if "shape" in node:
            return tuple(int_list(node["shape"], "shape")), dtype
        return info.shape, dtype
    except (KeyError, TypeError, ValueError) as exc:
        raise FormatError(f"{reader.path}: tensor at {path} is malformed ({exc})") from exc


def _node_dtype(reader: FileReader, node: dict) -> torch.dtype:
    if "dtype" in node:
        return dtype_from_name(node["dtype"])
    return SAFETENSORS_TO_TORCH[reader.entry(node["key"]).dtype]


def _load_file(
    model: nn.Module,
    reader: FileReader,
    *,
    strict: bool,
    verify: bool,
    key: str | tuple[str, ...] | None,
) -> LoadReport:
    with paused_gc():  # per-tensor planning allocates many small objects
        return _load_file_inner(model, reader, strict=strict, verify=verify, key=key)


def _load_file_inner(
    model: nn.Module,
    reader: FileReader,
    *,
    strict: bool,
    verify: bool,
    key: str | tuple[str, ...] | None,
) -> LoadReport:
    nodes, note = _file_sources(reader, key)
    report = LoadReport(source=reader.path, notes=[note] if note else [])
    targets = _targets(model)
    shapes = {k: _node_shape_dtype(reader, n, k) for k, n in nodes.items()}
    plan = _plan(report, targets, shapes)
    _check(report, strict)
    with torch.no_grad():
        direct, rest, seen = [], [], set()
        for tkey, skey in plan.items():
            data = targets[tkey].data
            # Each destination once in the parallel pass; tied parameters load in order after.
            if _is_direct(reader, nodes[skey], data) and data.data_ptr() not in seen:
                seen.add(data.data_ptr())
                direct.append((nodes[skey]["key"], data))
            else:
                rest.append((tkey, skey))
        try:
            reader.read_many(direct, verify)
            for tkey, skey in rest:
                _fill(reader, nodes[skey], targets[tkey], verify, skey)
        except CorruptionError as exc:
            raise CorruptionError(
                f"{exc}. The model was partly overwritten before the damage was found: "
                "reload it from a good checkpoint before using it"
            ) from exc
        report.loaded.extend(plan)
    return report


def _is_direct(reader: FileReader, node: dict, data: torch.Tensor) -> bool:
    """True when the file's bytes can be read straight into ``data`` (same dtype and layout)."""
    return (
        "view" not in node
        and "dtype" not in node
        and data.device.type == "cpu"
        and data.is_contiguous()
        and data.dtype == _node_dtype(reader, node)
    )


def _fill(reader: FileReader, node: dict, target: torch.Tensor, verify: bool, path: str) -> None:
    """Copy one tensor from the file into ``target``: directly when layouts allow, else via copy."""
    data = target.data
    if _is_direct(reader, node, data):
        reader.read_into(node["key"], data, verify)
        return
    entry = reader.read_entry(node["key"], verify)
    data.copy_(materialize(node, entry, reader.path, path))
