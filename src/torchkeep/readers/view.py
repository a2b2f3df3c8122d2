"""The checkpoint view every CLI command shares: tensors by flattened name, read lazily.

A view is built from a *skeleton*: the checkpoint's nested object with each tensor replaced by a
:class:`Ref` (dtype, shape and a function that reads the tensor on demand). Tensor names are the
dot-joined paths inside the checkpoint (``model_state.linear.weight``); the non-tensor leaves
(epoch, step, metrics, hyper-parameters) are exposed as flattened JSON-ready values.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .. import knobs
from ..errors import FormatError
from ..format.dtypes import dtype_name


@dataclass
class Ref:
    """A tensor that is not read yet: its dtype, shape and how to read it."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    fetch: Callable[[], torch.Tensor] = field(repr=False)
    #: Optional zero-copy read (a memory map of the file) for writers that must hold every
    #: tensor at once, such as ``torch.save``: mapped pages stay reclaimable by the OS.
    mapped: Callable[[], torch.Tensor] | None = field(default=None, repr=False)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _itemsize(self.dtype)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def ref_of(name: str, tensor: torch.Tensor) -> Ref:
    """A :class:`Ref` for a tensor that is already in memory (or memory-mapped)."""
    return Ref(name, tensor.dtype, tuple(tensor.shape), lambda: tensor)


class CheckpointView:
    """A checkpoint of any format, seen as named tensors plus non-tensor values.

    Subclasses pass the skeleton and may override :meth:`check` (integrity) and :meth:`close`.
    """

    #: Checksum algorithm of the format, or None when the format has no checksums.
    checksum_algorithm: str | None = None

    def __init__(self, path: str, fmt: str, skeleton: Any, notes: list[str] | None = None):
        self.path = path
        self.format = fmt
        self.skeleton = skeleton
        self.notes = list(notes or [])  # e.g. parts skipped because they need --trusted
        self.refs: dict[str, Ref] = {}
        self.values: dict[str, Any] = {}
        _flatten(skeleton, "", self.refs, self.values, _NameBudget(path))

    # -- tensors ---------------------------------------------------------------------------
    def names(self) -> list[str]:
        return list(self.refs)

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor (the only moment its bytes are touched)."""
        return self.refs[name].fetch()

    def iter_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name, ref in self.refs.items():
            yield name, ref.fetch()

    @property
    def total_bytes(self) -> int:
        return sum(r.nbytes for r in self.refs.values())

    @property
    def num_params(self) -> int:
        return sum(r.numel for r in self.refs.values())

    # -- the whole object ----------------------------------------------------------------------
    def materialize(self) -> Any:
        """The checkpoint's object with every tensor read (what ``torchkeep.load`` returns)."""
        return map_refs(self.skeleton, lambda ref: ref.fetch())

    def check(self, progress: Callable[[int], None] | None = None) -> list[str]:
        """Problems found by reading every tensor (checksums where the format has them)."""
        problems = []
        for name, ref in self.refs.items():
            try:
                tensor = ref.fetch()
                if tuple(tensor.shape) != ref.shape or tensor.dtype != ref.dtype:
                    problems.append(f"{name}: stored as {tensor.dtype}{list(tensor.shape)}")
            except Exception as exc:  # noqa: BLE001 - every failure is reported, by name
                problems.append(f"{name}: {exc}")
            if progress is not None:
                progress(ref.nbytes)
        return problems

    def close(self) -> None:
        """Release open files; the default view holds none."""

    def __enter__(self) -> CheckpointView:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _join(prefix: str, key: Any) -> str:
    return f"{prefix}.{key}" if prefix else str(key)


class _NameBudget:
    """Bounds the total length of flattened names: a long key above many values would
    otherwise make them quadratic in the file size (a 1 MB key over 100,000 values is 100 GB
    of names). Each name may use ``PER_NAME`` bytes on average, over ``ALLOWANCE``."""

    PER_NAME = 1024
    ALLOWANCE = 64 * 1024 * 1024

    def __init__(self, path: str) -> None:
        self.path = path
        self.left = self.ALLOWANCE

    def spend(self, name: str) -> None:
        self.left += self.PER_NAME - len(name)
        if self.left < 0:
            raise FormatError(
                f"{self.path}: flattened key names total more than {self.PER_NAME} bytes per "
                f"value (long keys above many values, e.g. {name[:60]!r}...)"
            )


def _flatten(
    obj: Any, prefix: str, refs: dict[str, Ref], values: dict[str, Any], budget: _NameBudget
) -> None:
    budget.spend(prefix)
    if isinstance(obj, Ref):
        obj.name = prefix or obj.name
        refs[obj.name] = obj
    elif isinstance(obj, dict):
        if not obj and prefix:
            values[prefix] = {}
        for key, value in obj.items():
            _flatten(value, _join(prefix, key), refs, values, budget)
    elif isinstance(obj, (list, tuple)) and not isinstance(obj, torch.Size):
        if not obj and prefix:
            values[prefix] = []
        for i, value in enumerate(obj):
            _flatten(value, _join(prefix, i), refs, values, budget)
    else:
        values[prefix or "<root>"] = jsonable(obj)


def jsonable(value: Any) -> Any:
    """A JSON-ready rendering of a non-tensor leaf (numbers and strings unchanged)."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, (np.generic,)) and value.dtype.kind in "biuf":
        return value.item()
    if isinstance(value, (set, frozenset)):
        return sorted((jsonable(v) for v in value), key=repr)
    if isinstance(value, torch.dtype):
        return dtype_name(value)
    return repr(value)


def map_refs(obj: Any, fn: Callable[[Ref], Any]) -> Any:
    """Rebuild ``obj`` with every :class:`Ref` replaced by ``fn(ref)`` (containers copied)."""
    if isinstance(obj, Ref):
        return fn(obj)
    if isinstance(obj, dict):
        out = _new_dict(obj)
        for key, value in obj.items():
            out[key] = map_refs(value, fn)
        return out
    if isinstance(obj, torch.Size):
        return obj
    if isinstance(obj, list):
        return [map_refs(v, fn) for v in obj]
    if isinstance(obj, tuple):
        return tuple(map_refs(v, fn) for v in obj)
    return obj


def _new_dict(obj: dict) -> dict:
    return collections.OrderedDict() if type(obj) is collections.OrderedDict else {}


def skeleton_of(obj: Any, prefix: str = "", where: str = "checkpoint", depth: int = 0) -> Any:
    """Replace every tensor in an in-memory object by a :class:`Ref` to it.

    Refs are named ``prefix`` here; :class:`CheckpointView` names each by its flattened path
    (building paths here too would cost a long key's length once per value below it). Nesting
    deeper than ``knobs.MAX_TREE_DEPTH`` (a pickle can nest a million lists in a few bytes)
    raises :class:`FormatError` naming ``where``.
    """
    if isinstance(obj, torch.Tensor):
        return ref_of(prefix or "tensor", obj)
    if not isinstance(obj, (dict, list, tuple)) or isinstance(obj, torch.Size):
        return obj
    if depth >= knobs.MAX_TREE_DEPTH:
        raise FormatError(f"{where}: nests deeper than {knobs.MAX_TREE_DEPTH} levels")
    if isinstance(obj, dict):
        out = _new_dict(obj)
        for key, value in obj.items():
            out[key] = skeleton_of(value, prefix, where, depth + 1)
        return out
    if isinstance(obj, list):
        return [skeleton_of(v, prefix, where, depth + 1) for v in obj]
    if type(obj) is tuple:
        return tuple(skeleton_of(v, prefix, where, depth + 1) for v in obj)
    return obj
