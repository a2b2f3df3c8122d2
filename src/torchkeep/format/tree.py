"""The typed tree: non-tensor values encoded as JSON that keeps Python types exactly.

``encode`` turns any nesting of dict / list / tuple / scalars / tensors into a JSON-ready node
and collects the tensors it found (each with a readable flattened key and an error path).
``decode`` rebuilds the object, calling back for tensors. Nothing here imports or calls code
named by a file: every tag maps to a fixed constructor. The node grammar is in docs/format.md.
"""

from __future__ import annotations

import base64
import collections
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .. import knobs
from ..errors import FormatError, UnsupportedValueError
from .dtypes import dtype_from_name, dtype_name

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
            raise UnsupportedValueError(f"{path}: nesting deeper than {knobs.MAX_TREE_DEPTH}")
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
            node["v"] = {k: self.encode(v, _join(path, k), [*parts, k]) for k, v in obj.items()}
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
        if type(t) not in (torch.Tensor, torch.nn.Parameter):
            raise UnsupportedValueError(
                f"{path or '<root>'}: tensor subclass {type(t).__qualname__} is not supported; "
                "save a plain tensor (for DTensor use torchkeep.distributed)"
            )
        device = t.device
        device_type = device.type
        if t.layout != torch.strided or t.is_quantized or device_type == "meta":
            raise UnsupportedValueError(
                f"{path or '<root>'}: {t.layout} / quantized / meta tensors cannot be saved; "
                "convert to a dense, materialized tensor first"
            )
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


def _join(path: str, key: str) -> str:
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


# ----------------------------------------------------------------------------------- decoding

TensorResolver = Callable[[dict, str], Any]


class _Decoder:
    def __init__(self, resolve: TensorResolver) -> None:
        self.resolve = resolve

    def decode(self, node: Any, path: str, depth: int) -> Any:
        if depth > knobs.MAX_TREE_DEPTH:
            raise FormatError(
                f"typed tree at {path or '<root>'}: nesting deeper than {knobs.MAX_TREE_DEPTH}"
            )
        if node is None or isinstance(node, (bool, int, str)):
            return node
        if isinstance(node, float):
            if not math.isfinite(node):
                raise FormatError(f"typed tree at {path}: bare non-finite float")
            return node
        if isinstance(node, list):
            return [self.decode(v, f"{path}[{i}]", depth + 1) for i, v in enumerate(node)]
        if isinstance(node, dict):
            tag = node.get(TAG)
            handler = _HANDLERS.get(tag) if isinstance(tag, str) else None
            if handler is None:
                raise FormatError(f"typed tree at {path or '<root>'}: unknown node tag {tag!r}")
            try:
                return handler(self, node, path, depth)
            except FormatError:
                raise
            except (
                KeyError,
                TypeError,
                ValueError,
                IndexError,
                OverflowError,
                RuntimeError,
            ) as exc:
                raise FormatError(
                    f"typed tree at {path or '<root>'}: malformed {tag!r} node ({exc})"
                ) from exc
        raise FormatError(f"typed tree at {path}: unexpected JSON value {type(node).__name__}")


def _items(node: dict, name: str = "v") -> list:
    value = node[name]
    if not isinstance(value, list):
        raise TypeError(f"{name!r} must be a list")
    return value


def _dec_dict(d: _Decoder, node: dict, path: str, depth: int) -> dict:
    out: dict = collections.OrderedDict() if node.get("ordered") is True else {}
    if "v" in node:
        if not isinstance(node["v"], dict):
            raise TypeError("'v' must be an object")
        for k, v in node["v"].items():
            out[k] = d.decode(v, _join(path, k), depth + 1)
    else:
        for pair in _items(node, "items"):
            if not isinstance(pair, list) or len(pair) != 2:
                raise TypeError("each item must be a [key, value] pair")
            key = d.decode(pair[0], path, depth + 1)
            if isinstance(key, (list, dict, set, torch.Tensor)):
                raise TypeError("dict key is not hashable")
            out[key] = d.decode(pair[1], f"{path}[{key!r}]", depth + 1)
    if "meta" in node:
        meta = d.decode(node["meta"], f"{path}._metadata", depth + 1)
        if isinstance(out, collections.OrderedDict) and isinstance(meta, dict):
            out._metadata = meta  # type: ignore[attr-defined]
    return out


def _dec_tuple(d: _Decoder, node: dict, path: str, depth: int) -> tuple:
    return tuple(d.decode(v, f"{path}[{i}]", depth + 1) for i, v in enumerate(_items(node)))


def _dec_set(d: _Decoder, node: dict, path: str, depth: int) -> set | frozenset:
    values = [d.decode(v, path, depth + 1) for v in _items(node)]
    return frozenset(values) if node[TAG] == "frozenset" else set(values)


def _dec_float(d: _Decoder, node: dict, path: str, depth: int) -> float:
    text = node["v"]
    if text not in ("inf", "-inf", "nan", "-nan"):
        raise ValueError(f"unexpected float text {text!r}")
    return -math.nan if text == "-nan" else float(text)


def _dec_size(d: _Decoder, node: dict, path: str, depth: int) -> torch.Size:
    dims = _items(node)
    if not all(type(x) is int and x >= 0 for x in dims) or len(dims) > knobs.MAX_RANK:
        raise ValueError("torch.Size needs a short list of non-negative ints")
    return torch.Size(dims)


def _dec_np_scalar(d: _Decoder, node: dict, path: str, depth: int) -> np.generic:
    dtype = _np_dtype(node["dtype"])
    raw = bytes.fromhex(node["v"])
    if len(raw) != dtype.itemsize:
        raise ValueError("byte length does not match the dtype")
    return np.frombuffer(raw, dtype=dtype)[0]


def _np_dtype(text: Any) -> np.dtype:
    if not isinstance(text, str) or len(text) > 8:
        raise ValueError("bad NumPy dtype")
    dtype = np.dtype(text)
    if dtype.hasobject or dtype.kind not in "biufc":
        raise ValueError(f"NumPy dtype {text!r} is not allowed")
    return dtype


def _dec_bytes(d: _Decoder, node: dict, path: str, depth: int) -> bytes | bytearray:
    raw = base64.b64decode(node["v"], validate=True)
    return bytearray(raw) if node[TAG] == "bytearray" else raw


def _dec_complex(d: _Decoder, node: dict, path: str, depth: int) -> complex:
    re_, im = _items(node)
    return complex(float(re_), float(im))


def _dec_slice(d: _Decoder, node: dict, path: str, depth: int) -> slice:
    parts = _items(node)
    if len(parts) != 3 or not all(p is None or type(p) is int for p in parts):
        raise ValueError("slice needs three ints or nulls")
    return slice(*parts)


def _dec_dtype(d: _Decoder, node: dict, path: str, depth: int) -> torch.dtype:
    return dtype_from_name(node["v"])


def _dec_device(d: _Decoder, node: dict, path: str, depth: int) -> torch.device:
    text = node["v"]
    if not isinstance(text, str) or len(text) > 64:
        raise ValueError("bad device string")
    return torch.device(text)


def _dec_tensor(d: _Decoder, node: dict, path: str, depth: int) -> Any:
    value = d.resolve(node, path)
    if node[TAG] == "ndarray":
        dtype = _np_dtype(node["np_dtype"])
        return value.numpy().astype(dtype, copy=False)
    return value


_HANDLERS: dict[str, Callable[[_Decoder, dict, str, int], Any]] = {
    "dict": _dec_dict,
    "tuple": _dec_tuple,
    "set": _dec_set,
    "frozenset": _dec_set,
    "float": _dec_float,
    "size": _dec_size,
    "np_scalar": _dec_np_scalar,
    "bytes": _dec_bytes,
    "bytearray": _dec_bytes,
    "complex": _dec_complex,
    "slice": _dec_slice,
    "dtype": _dec_dtype,
    "device": _dec_device,
    "tensor": _dec_tensor,
    "ndarray": _dec_tensor,
}


def decode(root: Any, resolve: TensorResolver, where: str = "") -> Any:
    """Rebuild the saved object; ``resolve(node, path)`` returns the tensor a node refers to.

    ``where`` (the file) prefixes every :class:`FormatError` message.
    """
    try:
        return _Decoder(resolve).decode(root, "", 0)
    except FormatError as exc:
        raise _located(exc, where) from exc


def _located(exc: FormatError, where: str) -> FormatError:
    message = str(exc)
    if not where or message.startswith(where):
        return exc
    return FormatError(f"{where}: {message}")


def iter_tensor_nodes(root: Any, where: str = "") -> list[tuple[str, dict]]:
    """(error path, node) of every tensor/ndarray node, without materializing anything."""
    found: list[tuple[str, dict]] = []

    def visit(node: Any, path: str, depth: int) -> None:
        if depth > knobs.MAX_TREE_DEPTH:
            raise FormatError(f"typed tree at {path}: nesting deeper than {knobs.MAX_TREE_DEPTH}")
        if isinstance(node, list):
            for i, v in enumerate(node):
                visit(v, f"{path}[{i}]", depth + 1)
        elif isinstance(node, dict):
            tag = node.get(TAG)
            if tag in ("tensor", "ndarray"):
                found.append((path, node))
            elif tag == "dict" and isinstance(node.get("v"), dict):
                for k, v in node["v"].items():
                    visit(v, _join(path, k), depth + 1)
            elif tag == "dict" and isinstance(node.get("items"), list):
                for pair in node["items"]:
                    if isinstance(pair, list) and len(pair) == 2:
                        visit(pair[1], f"{path}[{pair[0]!r}]", depth + 1)
            elif isinstance(node.get("v"), list):
                for i, v in enumerate(node["v"]):
                    visit(v, f"{path}[{i}]", depth + 1)

    try:
        visit(root, "", 0)
    except FormatError as exc:
        raise _located(exc, where) from exc
    return found
