"""Decoding the typed tree (``format/tree.py`` encodes it): JSON nodes back into Python values.

Every tag maps to a fixed constructor; nothing named by the file is imported or called. Each
number is checked before it is used, and every error is a :class:`FormatError` with the key
path (and, through ``where``, the file).
"""

from __future__ import annotations

import base64
import collections
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from .. import knobs
from ..errors import FormatError
from .dtypes import dtype_from_name
from .tree import TAG, join_path, short_path

TensorResolver = Callable[[dict, str], Any]


class _Decoder:
    def __init__(self, resolve: TensorResolver) -> None:
        self.resolve = resolve

    def decode(self, node: Any, path: str, depth: int) -> Any:
        if depth > knobs.MAX_TREE_DEPTH:
            raise FormatError(
                f"typed tree at {short_path(path)}: nesting deeper than {knobs.MAX_TREE_DEPTH}"
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
            out[k] = d.decode(v, join_path(path, k), depth + 1)
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
            raise FormatError(
                f"typed tree at {short_path(path)}: nesting deeper than {knobs.MAX_TREE_DEPTH}"
            )
        if isinstance(node, list):
            for i, v in enumerate(node):
                visit(v, f"{path}[{i}]", depth + 1)
        elif isinstance(node, dict):
            tag = node.get(TAG)
            if tag in ("tensor", "ndarray"):
                found.append((path, node))
            elif tag == "dict" and isinstance(node.get("v"), dict):
                for k, v in node["v"].items():
                    visit(v, join_path(path, k), depth + 1)
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
