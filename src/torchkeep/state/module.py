"""Load a state dict into a live module in place, explaining every mismatch.

Tensors from a torchkeep/safetensors file are read straight into the module's existing
parameters and buffers (``readinto`` their memory, checksummed on the way), so the checkpoint
never exists twice in memory. With ``strict=True`` nothing is modified unless every key fits.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, BinaryIO

import torch
from torch import nn

from ..args import MapLocation, check_flag, check_map_location
from ..engine import load
from ..errors import FormatError, StateDictMismatchError
from ..format.dtypes import SAFETENSORS_TO_TORCH, dtype_from_name
from ..format.tree import TAG
from ..readers import detect
from ..storage.fileobj import is_file_object, readable_copy
from ..storage.urls import is_url
from ..transfer.gcpause import paused_gc
from ..transfer.reader import FileReader, int_list, materialize
from .keys import match_keys
from .placement import Placement, check_meta, stays_on_meta, tie_missing
from .report import LoadReport
from .select import WRAPPER_KEYS, Kinds, select

__all__ = ["WRAPPER_KEYS", "load_from_reader", "load_state_dict"]

Source = str | os.PathLike[str] | Mapping[str, Any] | BinaryIO
"""What :func:`load_state_dict` reads: a path (any format ``torchkeep.load`` opens), a mapping
of tensors, or a seekable binary file object."""
#: A tensor's shape and dtype, as planned from a mapping or a file header.
ShapeDtype = tuple[tuple[int, ...], torch.dtype]
#: A tensor node of a torchkeep file's typed tree (a JSON object).
Node = dict[str, Any]


def load_state_dict(
    model: nn.Module,
    source: Source,
    *,
    strict: bool = True,
    verify: bool = True,
    key: str | None = None,
    prefix: str | None = None,
    map_location: MapLocation = None,
    assign: bool = False,
    storage_options: dict[str, Any] | None = None,
) -> LoadReport:
    """Load ``source`` (a path, a mapping or a binary file object) into ``model``; report it.

    ``key`` picks the sub-dict holding the weights by dotted path (``"state_dict.net"``), through
    nested dicts or flat dotted keys alike; when omitted, a flat state dict is used as is and a
    ``state_dict``/``model_state_dict``/``model_state``/``model`` entry is unwrapped. ``prefix``
    keeps only the keys starting with it and removes it (``prefix="net."``).
    ``module.``/``_orig_mod.`` prefixes are normalized. Each tensor lands on the device of the
    parameter it fills (a file saved on a GPU loads into a CPU model); ``map_location`` says where
    ``torch.save`` files are read to first (default: the model's device), and where tensors go
    with ``assign``.
    ``assign=True`` makes the loaded tensors the parameters (models built on ``meta``); without
    it a model on ``meta`` is refused. With ``strict=True`` a mismatch raises
    :class:`StateDictMismatchError` before any change.
    """
    check_map_location(map_location)
    for name, flag in (("strict", strict), ("verify", verify), ("assign", assign)):
        check_flag(flag, name)
    if key is not None and not (isinstance(key, str) and key):
        raise TypeError(f"key must be a non-empty dotted string such as 'state_dict', not {key!r}")
    place = Placement(assign, map_location)
    if is_file_object(source):
        with readable_copy(source) as tmp:
            report = load_state_dict(
                model, tmp, strict=strict, verify=verify, key=key, prefix=prefix,
                map_location=map_location, assign=assign,
            )  # fmt: skip
        report.source = f"<{type(source).__name__}>"
        return report
    if isinstance(source, Mapping):
        return _load_mapping(model, source, strict=strict, key=key, prefix=prefix, place=place)
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(
            "source must be a path, a mapping of tensors or a binary file object, not "
            f"{type(source).__name__}"
        )
    path = os.fspath(source)
    if is_url(path):  # torchkeep/safetensors objects: ranged reads straight into the model
        with FileReader(path, storage_options) as reader:
            return _load_file(
                model, reader, verify=verify, strict=strict, key=key, prefix=prefix, place=place
            )
    if detect.sniff(path) != detect.SAFETENSORS:  # torch.save file, or a folder checkpoint
        state = load(path, map_location=place.read_location(model), verify=verify)
        return _load_mapping(
            model, state, name=path, strict=strict, key=key, prefix=prefix, place=place
        )
    with FileReader(path) as reader:
        return _load_file(
            model, reader, verify=verify, strict=strict, key=key, prefix=prefix, place=place
        )


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
    return _load_file(
        model, reader, strict=strict, verify=verify, key=parts, prefix=None, place=Placement()
    )


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
    report: LoadReport, targets: dict[str, torch.Tensor], sources: dict[str, ShapeDtype]
) -> dict[str, str]:
    """Fill the report; returns target key -> source key for the tensors that will load."""
    mapping, notes = match_keys(list(sources), list(targets))
    report.notes.extend(notes)
    used = set(mapping.values())
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
    missing = [k for k in targets if k not in mapping]
    report.missing, report.tied = tie_missing(missing, plan, targets)
    if report.tied:
        report.notes.append(
            f"{len(report.tied)} tied tensors (e.g. {report.tied[0][0]} is "
            f"{report.tied[0][1]}) were loaded through the tensor they share"
        )
    return plan


def _prepare(
    model: nn.Module,
    report: LoadReport,
    sources: dict[str, ShapeDtype],
    strict: bool,
    place: Placement,
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Plan, then refuse (before any change) a mismatch under ``strict`` or a no-op on meta."""
    targets = _targets(model)
    plan = _plan(report, targets, sources)
    _check(report, strict)
    check_meta(report.source, targets, plan, place.assign)
    return targets, plan


def _finish(report: LoadReport, targets: dict[str, torch.Tensor], plan: dict[str, str]) -> None:
    report.loaded.extend(plan)
    on_meta = stays_on_meta(targets, plan, report.tied)
    if on_meta:
        report.notes.append(
            f"{len(on_meta)} tensors were not in the checkpoint and stay on the meta device "
            f"(e.g. {on_meta[0]}); initialize them before use"
        )


def _tensor_kinds() -> Kinds:
    return Kinds(lambda v: isinstance(v, torch.Tensor), lambda v: isinstance(v, Mapping))


def _load_mapping(
    model: nn.Module,
    state: Any,
    *,
    strict: bool,
    key: str | None,
    prefix: str | None,
    place: Placement,
    name: str = "<mapping>",
) -> LoadReport:
    targets = _targets(model)
    tensors, notes = select(
        state, key=key, prefix=prefix, kinds=_tensor_kinds(), name=name, target_keys=targets
    )
    report = LoadReport(source=name, notes=notes)
    shapes = {k: (tuple(v.shape), v.dtype) for k, v in tensors.items()}
    targets, plan = _prepare(model, report, shapes, strict, place)
    with torch.no_grad():
        if place.assign:
            place.assign_all(model, targets, plan, report.tied, lambda s: tensors[s])
        else:
            for tkey, skey in plan.items():
                targets[tkey].copy_(tensors[skey])
    _finish(report, targets, plan)
    return report


def _file_sources(
    reader: FileReader,
    key: str | tuple[str, ...] | None,
    prefix: str | None,
    target_keys: Any,
) -> tuple[dict[str, Node], list[str]]:
    """Map state-dict key -> tensor node, by walking the typed tree (no tensor is read)."""

    def is_leaf(node: Any) -> bool:
        return isinstance(node, dict) and node.get(TAG) == "tensor"

    kinds = Kinds(is_leaf, lambda node: isinstance(node, _Mapping))
    plain = _node_to_plain(reader.tree)
    return select(
        plain, key=key, prefix=prefix, kinds=kinds, name=reader.path, target_keys=target_keys
    )


class _Mapping(dict[str, Any]):
    """A dict node of the file turned into a dict; any other dict met in the tree is a node."""


def _node_to_plain(node: Any) -> Any:
    """Turn string-keyed dict nodes into dicts (tensor nodes stay nodes) for navigation."""
    if isinstance(node, dict) and node.get(TAG) == "dict" and isinstance(node.get("v"), dict):
        return _Mapping((k, _node_to_plain(v)) for k, v in node["v"].items())
    return node


def _node_shape_dtype(reader: FileReader, node: Node, path: str) -> ShapeDtype:
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


def _node_dtype(reader: FileReader, node: Node) -> torch.dtype:
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
    prefix: str | None,
    place: Placement,
) -> LoadReport:
    with paused_gc():  # per-tensor planning allocates many small objects
        nodes, notes = _file_sources(reader, key, prefix, _targets(model))
        report = LoadReport(source=reader.path, notes=notes)
        shapes = {k: _node_shape_dtype(reader, n, k) for k, n in nodes.items()}
        targets, plan = _prepare(model, report, shapes, strict, place)
        if verify and not place.assign:
            # All or nothing: every checksum is checked before the first byte lands in the
            # model (the file is read twice, the second time from the page cache).
            reader.verify_many([nodes[skey]["key"] for skey in plan.values()])
        with torch.no_grad():
            if place.assign:  # fresh tensors: the model changes only once all are read
                read = _reading(reader, nodes, verify)
                place.assign_all(model, targets, plan, report.tied, read)
            else:
                _read_in_place(reader, nodes, targets, plan, verify=False)
        _finish(report, targets, plan)
    return report


def _reading(reader: FileReader, nodes: dict[str, Node], verify: bool) -> Any:
    """``source key -> tensor`` read from the file (entries shared by several keys read once)."""
    cache: dict[str, torch.Tensor] = {}

    def read(skey: str) -> torch.Tensor:
        node = nodes[skey]
        if node["key"] not in cache:
            cache[node["key"]] = reader.read_entry(node["key"], verify)
        return materialize(node, cache[node["key"]], reader.path, skey)

    return read


def _read_in_place(
    reader: FileReader,
    nodes: dict[str, Node],
    targets: dict[str, torch.Tensor],
    plan: dict[str, str],
    verify: bool,
) -> None:
    direct, rest, seen = [], [], set()
    for tkey, skey in plan.items():
        data = targets[tkey].data
        # Each destination once in the parallel pass; tied parameters load in order after.
        if _is_direct(reader, nodes[skey], data) and data.data_ptr() not in seen:
            seen.add(data.data_ptr())
            direct.append((nodes[skey]["key"], data))
        else:
            rest.append((tkey, skey))
    reader.read_many(direct, verify)
    for tkey, skey in rest:
        _fill(reader, nodes[skey], targets[tkey], verify, skey)


def _is_direct(reader: FileReader, node: Node, data: torch.Tensor) -> bool:
    """True when the file's bytes can be read straight into ``data`` (same dtype and layout)."""
    return (
        "view" not in node
        and "dtype" not in node
        and data.device.type == "cpu"
        and data.is_contiguous()
        and data.dtype == _node_dtype(reader, node)
    )


def _fill(reader: FileReader, node: Node, target: torch.Tensor, verify: bool, path: str) -> None:
    """Copy one tensor from the file into ``target``: directly when layouts allow, else via copy."""
    data = target.data
    if _is_direct(reader, node, data):
        reader.read_into(node["key"], data, verify)
        return
    entry = reader.read_entry(node["key"], verify)
    data.copy_(materialize(node, entry, reader.path, path))
