"""The restricted allow-list that lets weights-only loads read NumPy values (RNG states).

Frameworks save RNG state with ``torch.save``: ``np.random.get_state()`` holds a ``uint32``
array, so the pickle names ``numpy.ndarray``, ``numpy.dtype`` and ``_reconstruct``; metrics may
hold NumPy scalars (``multiarray.scalar``). torch's weights-only unpickler refuses those names.
Allow-listing the real NumPy callables would hand a crafted pickle ``ndarray(shape)`` (an
allocation of any size, uninitialized memory) and ``ndarray.__setstate__``/``dtype.__setstate__``
with unchecked state (object arrays, structured dtypes). So each name maps to a stand-in that
accepts exactly the shape NumPy itself writes for a plain numeric array, dtype or scalar and
checks every number before it sizes anything; :func:`resolve` then swaps the stand-ins for real
NumPy objects. Nothing else from NumPy is reachable.

:data:`ALLOWED_NAMES` is plain data (``module.name`` strings) for the pickle scanner and the
refusal messages; :func:`allowed` is the context manager that lets ``torch.load`` use them.
"""

from __future__ import annotations

import math
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pickle import UnpicklingError
from typing import Any

import numpy as np
import torch

#: NumPy dtype codes a stand-in accepts: bool, signed/unsigned ints, floats, complex.
_DTYPE_SPEC = re.compile(r"^(b1|[iu][1248]|f[248]|c(8|16))$")
_BYTE_ORDERS = ("<", ">", "|", "=")
#: Largest array a stand-in builds (1 GiB): RNG states are a few KiB, metrics a few bytes.
MAX_ARRAY_BYTES = 1 << 30
MAX_NDIM = 32


class _NdarrayName:
    """What ``numpy.ndarray`` resolves to: a token ``_reconstruct`` checks, never callable."""

    def __call__(self, *args: Any) -> Any:
        raise UnpicklingError("numpy.ndarray may only appear as the subtype of _reconstruct")


NDARRAY = _NdarrayName()


class PendingDtype:
    """``numpy.dtype(spec, align, copy)`` for plain numeric specs; byte order set by BUILD."""

    def __init__(self, spec: Any = None, align: Any = False, copy: Any = True) -> None:
        if not (isinstance(spec, str) and _DTYPE_SPEC.match(spec)):
            raise UnpicklingError(f"numpy dtype {spec!r} is outside the numeric allow-list")
        if align is not False or copy is not True:
            raise UnpicklingError("numpy dtype with unusual align/copy flags refused")
        self.spec = spec
        self.order = "="

    def __setstate__(self, state: Any) -> None:
        ok = (
            isinstance(state, tuple)
            and len(state) == 8
            and state[0] == 3
            and state[1] in _BYTE_ORDERS
            and state[2:5] == (None, None, None)
            and state[5:] == (-1, -1, 0)
        )
        if not ok:
            raise UnpicklingError("numpy dtype state is not that of a plain numeric dtype")
        self.order = state[1]

    def real(self) -> np.dtype:
        dtype = np.dtype(self.spec)
        if self.order == "<":  # spelled out: numpy's stubs take only literal byte orders
            return dtype.newbyteorder("<")
        if self.order == ">":
            return dtype.newbyteorder(">")
        return dtype


class PendingArray:
    """``_reconstruct(ndarray, (0,), b'b')``; BUILD fills it from checked state."""

    def __init__(self) -> None:
        self.array: np.ndarray | None = None

    def __setstate__(self, state: Any) -> None:
        if not (isinstance(state, tuple) and len(state) == 5 and state[0] == 1):
            raise UnpicklingError("numpy array state has an unknown layout")
        _, shape, dtype, fortran, raw = state
        if not isinstance(dtype, PendingDtype) or not isinstance(raw, bytes):
            raise UnpicklingError("numpy array state must hold a numeric dtype and raw bytes")
        real = dtype.real()
        count = _checked_count(shape)
        if count * real.itemsize != len(raw) or len(raw) > MAX_ARRAY_BYTES:
            raise UnpicklingError(
                f"numpy array of shape {shape} {real} does not match its {len(raw)} data bytes"
            )
        flat = np.frombuffer(raw, dtype=real).copy()
        self.array = flat.reshape(shape, order="F" if fortran is True else "C")


def _checked_count(shape: Any) -> int:
    if not isinstance(shape, tuple) or len(shape) > MAX_NDIM:
        raise UnpicklingError(f"numpy array shape {shape!r} is not a tuple of at most 32 dims")
    if not all(type(d) is int and 0 <= d <= MAX_ARRAY_BYTES for d in shape):
        raise UnpicklingError(f"numpy array shape {shape!r} holds an invalid dimension")
    return math.prod(shape)


def reconstruct(subtype: Any, shape: Any, typecode: Any) -> PendingArray:
    """Stand-in for ``numpy.core.multiarray._reconstruct`` (plain ndarrays only)."""
    if subtype is not NDARRAY or shape != (0,) or typecode != b"b":
        raise UnpicklingError("numpy _reconstruct accepts only a plain ndarray")
    return PendingArray()


def scalar(dtype: Any, raw: Any) -> np.generic:
    """Stand-in for ``numpy.core.multiarray.scalar``: a numeric scalar from its bytes."""
    if not isinstance(dtype, PendingDtype) or not isinstance(raw, bytes):
        raise UnpicklingError("numpy scalar must be a numeric dtype and raw bytes")
    real = dtype.real()
    if len(raw) != real.itemsize:
        raise UnpicklingError(f"numpy {real} scalar needs {real.itemsize} bytes, got {len(raw)}")
    return np.frombuffer(raw, dtype=real)[0].copy()


def empty_bytes(*args: Any) -> bytes:
    """Stand-in for ``bytes`` as protocol 2 pickles call it: ``bytes()`` for empty data only.

    The real ``bytes(n)`` would allocate ``n`` bytes on a file's say-so.
    """
    if args:
        raise UnpicklingError("bytes(...) with arguments refused; only bytes() is allowed")
    return b""


_ENTRIES: list[tuple[Any, str]] = [
    (NDARRAY, "numpy.ndarray"),
    (PendingDtype, "numpy.dtype"),
    (reconstruct, "numpy.core.multiarray._reconstruct"),
    (reconstruct, "numpy._core.multiarray._reconstruct"),
    (scalar, "numpy.core.multiarray.scalar"),
    (scalar, "numpy._core.multiarray.scalar"),
    (empty_bytes, "__builtin__.bytes"),  # the empty data of a zero-size array
    (empty_bytes, "builtins.bytes"),
    # The stand-in classes must be listed so torch lets BUILD call their __setstate__.
    (PendingArray, f"{__name__}.PendingArray"),
]

#: ``module.name`` of every global the restricted allow-list adds to torch's weights-only set.
ALLOWED_NAMES: frozenset[str] = frozenset(name for _, name in _ENTRIES)

_lock = threading.Lock()
_users = 0


@contextmanager
def allowed() -> Iterator[None]:
    """Let weights-only ``torch.load`` calls inside the block use the stand-ins.

    torch keeps safe globals process-wide; a counter keeps them registered while any thread
    is inside the block and removes them after the last one leaves.
    """
    global _users
    with _lock:
        if _users == 0:
            torch.serialization.add_safe_globals(list(_ENTRIES))
        _users += 1
    try:
        yield
    finally:
        with _lock:
            _users -= 1
            if _users == 0:
                _remove(list(_ENTRIES))


def _remove(entries: list[Any]) -> None:
    from torch import _weights_only_unpickler as wou  # no public remove in torch's API

    wou._remove_safe_globals(entries)


def resolve(obj: Any) -> Any:
    """``obj`` with every stand-in replaced by the real NumPy array or dtype."""
    if isinstance(obj, PendingArray):
        if obj.array is None:
            raise UnpicklingError("numpy array without state in the pickle")
        return obj.array
    if isinstance(obj, PendingDtype):
        return obj.real()
    if isinstance(obj, dict):  # fresh from torch.load: fixed in place, keeping its type
        items = [(resolve(k), resolve(v)) for k, v in obj.items()]
        obj.clear()
        obj.update(items)
        return obj
    if isinstance(obj, list):
        obj[:] = [resolve(v) for v in obj]
        return obj
    if type(obj) is tuple:
        return tuple(resolve(v) for v in obj)
    return obj
