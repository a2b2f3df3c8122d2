"""The typed tree: non-tensor values encoded as JSON that keeps Python types exactly.

``encode`` turns any nesting of dict / list / tuple / scalars / tensors into a JSON-ready node
and collects the tensors it found (each with a readable flattened key and an error path).
``format/tree_decode.py`` rebuilds the object from it. Every Python type maps to one fixed tag,
so a reader never needs to import or call anything named by a file. The node grammar is in
docs/format.md.
"""

from __future__ import annotations

import base64
import collections
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .. import knobs
from ..errors import UnsupportedValueError
from .dtypes import dtype_name

TAG = "$"
#: Flattened keys that cannot name a tensor (the safetensors header reserves ``__metadata__``).
RESERVED_KEYS = frozenset({"__metadata__"})
#: Largest int stored in the tree: Python refuses to parse ints over 4300 digits by default.
MAX_INT_BITS = 14_000


@dataclass(slots=True)
class TensorLeaf:
    """A tensor found while encoding; ``node`` is completed later by the layout planner."""

    key: str
    path: str
    tensor: torch.Tensor
    node: dict = field(default_factory=dict)


def claim_key(taken: set[str], base: str) -> str:
    """Add the first of ``base``, ``base#2``, ``base#3``... not in ``taken`` and return it."""
    key, n = base, 1
    while key in taken:
        n += 1
        key = f"{base}#{n}"
    taken.add(key)
    return key


class _Encoder:
    def __init__(self) -> None:
        self.leaves: list[TensorLeaf] = []
        self._keys: set[str] = set(RESERVED_KEYS)
        self._active: set[int] = set()

    def unique_key(self, parts: list[str]) -> str:
        """Dot-joined path, made unique with ``#2``, ``#3``... (and never a reserved name)."""
        base = ".".join(parts) or "tensor"
        if not base.isascii():  # header keys must be valid UTF-8: lone surrogates become \udXXX
            base = base.encode("utf-8", "backslashreplace").decode("utf-8")
        return claim_key(self._keys, base)

    def encode(self, obj: Any, path: str, parts: list[str]) -> Any:
        if obj is None or type(obj) in (bool, str):
            return obj
        if type(obj) is int:
            if obj.bit_length() > MAX_INT_BITS:
                raise UnsupportedValueError(
                    f"{path or '<root>'}: an int of {obj.bit_length()} bits is too large for "
                    "JSON readers (over ~4000 digits); store it as bytes or a string"
                )
            return obj
        if type(obj) is float:
            return obj if math.isfinite(obj) else {TAG: "float", "v": _float_text(obj)}
        if isinstance(obj, torch.Tensor):
            return self._tensor(obj, path, parts)
        if isinstance(obj, np.ndarray):
            return self._ndarray(obj, path, parts)
        if isinstance(obj, np.generic):
            return _np_scalar(obj, path)
        if isinstance(obj, (dict, list, tuple, set, frozenset)):
            return self._container(obj, path, parts)
        return _simple(obj, path)

    def _container(self, obj: Any, path: str, parts: list[str]) -> Any:
        if id(obj) in self._active:
            raise UnsupportedValueError(f"{path or '<root>'}: the value contains itself (a cycle)")
        if len(self._active) >= knobs.MAX_TREE_DEPTH:
            raise UnsupportedValueError(
                f"{short_path(path)}: nesting deeper than {knobs.MAX_TREE_DEPTH} levels; "
                "flatten the structure (or raise TORCHKEEP_MAX_TREE_DEPTH)"
            )
        self._active.add(id(obj))
        try:
            if isinstance(obj, dict):
                return self._dict(obj, path, parts)
            if isinstance(obj, (set, frozenset)):
                return self._set(obj, path)
            return self._sequence(obj, path, parts)
        finally:
            self._active.discard(id(obj))

    def _sequence(self, obj: list | tuple, path: str, parts: list[str]) -> Any:
        if isinstance(obj, torch.Size):
            return {TAG: "size", "v": [int(d) for d in obj]}
        kind = type(obj)
        if kind not in (list, tuple):
            raise UnsupportedValueError(
                f"{path or '<root>'}: {kind.__module__}.{kind.__qualname__} is not supported; "
                "convert it to a plain tuple, list or dict before saving"
            )
        items = [self.encode(v, f"{path}[{i}]", [*parts, str(i)]) for i, v in enumerate(obj)]
        return items if kind is list else {TAG: "tuple", "v": items}

    def _set(self, obj: set | frozenset, path: str) -> dict:
        items = [self.encode(v, f"{path}{{}}", []) for v in obj]
        if any(isinstance(i, dict) and i.get(TAG) in ("tensor", "ndarray") for i in items):
            raise UnsupportedValueError(f"{path}: sets of tensors cannot be saved")
        return {TAG: "frozenset" if isinstance(obj, frozenset) else "set", "v": items}

    def _dict(self, obj: dict, path: str, parts: list[str]) -> dict:
        kind = type(obj)
        if kind not in (dict, collections.OrderedDict):
            raise UnsupportedValueError(
                f"{path or '<root>'}: {kind.__module__}.{kind.__qualname__} is not supported; "
                "convert it to a plain dict before saving"
            )
        node: dict[str, Any] = {TAG: "dict"}
        if kind is collections.OrderedDict:
            node["ordered"] = True
        if all(type(k) is str for k in obj):
            node["v"] = {k: self.encode(v, join_path(path, k), [*parts, k]) for k, v in obj.items()}
        else:
            node["items"] = [
                [self._key(k, path), self.encode(v, f"{path}[{k!r}]", [*parts, str(k)])]
                for k, v in obj.items()
            ]
        meta = getattr(obj, "_metadata", None)
        if isinstance(meta, dict):
            # nn.Module.state_dict() keeps per-module versions here; load_state_dict reads them.
            node["meta"] = self.encode(meta, f"{path}._metadata", [])
        return node

    def _key(self, key: Any, path: str) -> Any:
        if isinstance(key, (torch.Tensor, np.ndarray)):
            raise UnsupportedValueError(f"{path}: tensors cannot be dict keys")
        return self.encode(key, f"{path}[{key!r}]", [])

    def _tensor(self, t: torch.Tensor, path: str, parts: list[str]) -> dict:
        refusal = unsupported_tensor(t)
        if refusal:
            raise UnsupportedValueError(f"{short_path(path)}: {refusal}")
        device = t.device
        device_type = device.type
        node: dict[str, Any] = {TAG: "tensor"}
        if not parts and not path:
            parts = ["tensor"]
        self.leaves.append(TensorLeaf(self.unique_key(parts), path, t, node))
        if type(t) is torch.nn.Parameter:
            node["param"] = True
        if t.requires_grad:
            node["requires_grad"] = True
        if device_type != "cpu":
            node["device"] = str(device)
        return node

    def _ndarray(self, arr: np.ndarray, path: str, parts: list[str]) -> dict:
        if arr.dtype.hasobject or arr.dtype.kind not in "biufc":
            raise UnsupportedValueError(
                f"{path}: NumPy arrays of dtype {arr.dtype} cannot be saved safely"
            )
        native = np.ascontiguousarray(arr).astype(arr.dtype.newbyteorder("="), copy=False)
        try:
            tensor = torch.from_numpy(native)
        except TypeError as exc:
            raise UnsupportedValueError(
                f"{path}: NumPy dtype {arr.dtype} is not supported"
            ) from exc
        node = self._tensor(tensor, path, parts)
        node[TAG] = "ndarray"
        node["np_dtype"] = arr.dtype.str
        return node


def _float_text(value: float) -> str:
    """``inf``, ``-inf``, ``nan`` or ``-nan`` (the sign of a NaN is kept, its payload is not)."""
    if math.isnan(value):
        return "-nan" if math.copysign(1.0, value) < 0 else "nan"
    return repr(value)


def short_path(path: str, limit: int = 120) -> str:
    """``path`` for a message: its start and end around an elision when longer than ``limit``."""
    if not path:
        return "<root>"
    if len(path) <= limit:
        return path
    keep = (limit - 5) // 2
    return f"{path[:keep]} ... {path[-keep:]} ({len(path)} characters)"


_SPARSE_PARTS = {
    torch.sparse_coo: "t.indices() and t.values()",
    torch.sparse_csr: "t.crow_indices(), t.col_indices() and t.values()",
    torch.sparse_csc: "t.ccol_indices(), t.row_indices() and t.values()",
}


def unsupported_tensor(t: torch.Tensor) -> str | None:
    """Why ``t`` cannot be saved, naming its kind and what to save instead; None if it can."""
    if t.is_nested:
        return "nested tensors cannot be saved; save its components instead (list(t.unbind()))"
    if type(t) not in (torch.Tensor, torch.nn.Parameter):
        name = type(t).__qualname__
        hint = "use torchkeep.distributed" if name == "DTensor" else "save a plain tensor"
        return f"tensor subclass {name} is not supported; {hint}"
    if t.layout in _SPARSE_PARTS or t.layout == torch.sparse_bsr or t.layout == torch.sparse_bsc:
        parts = _SPARSE_PARTS.get(t.layout, "its index and value tensors")
        return (
            f"sparse tensors ({t.layout}) cannot be saved; save t.to_dense(), or its parts "
            f"({parts}) with its shape"
        )
    if t.layout != torch.strided:
        return f"tensors with layout {t.layout} cannot be saved; save t.to_dense()"
    if t.is_quantized:
        return (
            f"quantized tensors ({t.dtype}) cannot be saved; save t.dequantize(), or "
            "t.int_repr() with its scale and zero point"
        )
    if t.device.type == "meta":
        return (
            "tensors on the meta device hold no data and cannot be saved; materialize them "
            "first (e.g. load real weights with load_state_dict(..., assign=True))"
        )
    return None


def join_path(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _np_scalar(value: np.generic, path: str) -> dict:
    if value.dtype.hasobject or value.dtype.kind not in "biufc":
        raise UnsupportedValueError(f"{path}: NumPy scalar of dtype {value.dtype} is not supported")
    return {TAG: "np_scalar", "dtype": value.dtype.str, "v": value.tobytes().hex()}


def _simple(obj: Any, path: str) -> Any:
    if isinstance(obj, int):  # int subclasses other than bool (e.g. IntEnum) lose their type
        raise UnsupportedValueError(
            f"{path or '<root>'}: {type(obj).__qualname__} is an int subclass; save int(value)"
        )
    if isinstance(obj, torch.dtype):
        return {TAG: "dtype", "v": dtype_name(obj)}
    if isinstance(obj, torch.device):
        return {TAG: "device", "v": str(obj)}
    if isinstance(obj, (bytes, bytearray)):
        return {
            TAG: "bytes" if isinstance(obj, bytes) else "bytearray",
            "v": base64.b64encode(bytes(obj)).decode("ascii"),
        }
    if type(obj) is complex:
        return {TAG: "complex", "v": [repr(obj.real), repr(obj.imag)]}
    if isinstance(obj, slice):
        return {
            TAG: "slice",
            "v": [_simple_slice_part(p, path) for p in (obj.start, obj.stop, obj.step)],
        }
    kind = type(obj)
    raise UnsupportedValueError(
        f"{path or '<root>'}: a value of type {kind.__module__}.{kind.__qualname__} cannot be "
        "saved safely (torchkeep stores tensors, numbers, strings, bytes, None, dtypes, devices "
        "and dict/list/tuple of them); convert it or leave it out"
    )


def _simple_slice_part(part: Any, path: str) -> Any:
    if part is None or type(part) is int:
        return part
    raise UnsupportedValueError(f"{path}: slices may hold only ints and None")


def encode(obj: Any) -> tuple[Any, list[TensorLeaf]]:
    """Encode ``obj``; returns the root node and the tensors in encounter order.

    Raises :class:`UnsupportedValueError` naming the key path of the first value that cannot
    be stored. Nothing is written before this succeeds.
    """
    encoder = _Encoder()
    root = encoder.encode(obj, "", [])
    return root, encoder.leaves
