"""Mapping between torch dtypes and the dtype names of the safetensors format.

Dtypes that safetensors cannot name (complex128, float8_e8m0fnu, ...) are stored as raw ``U8``
bytes; the typed tree records the real dtype so torchkeep restores it exactly.
"""

from __future__ import annotations

import functools
import warnings

import torch

from ..errors import UnsupportedValueError

#: safetensors dtype name -> torch dtype, for every name the stock library reads into torch.
SAFETENSORS_TO_TORCH: dict[str, torch.dtype] = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "U16": torch.uint16,
    "I32": torch.int32,
    "U32": torch.uint32,
    "I64": torch.int64,
    "U64": torch.uint64,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
    "C64": torch.complex64,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
TORCH_TO_SAFETENSORS: dict[torch.dtype, str] = {v: k for k, v in SAFETENSORS_TO_TORCH.items()}

#: Bytes per element of every safetensors dtype name (validated before any allocation).
ITEMSIZE: dict[str, int] = {
    name: torch.empty((), dtype=dt).element_size() for name, dt in SAFETENSORS_TO_TORCH.items()
}

_QUANTIZED = {torch.qint8, torch.quint8, torch.qint32, torch.quint4x2, torch.quint2x4}


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` -> ``"float32"`` (the spelling used in tree nodes and the CLI)."""
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    """Inverse of :func:`dtype_name`; raises ``ValueError`` for names torch does not know."""
    value = getattr(torch, name, None) if isinstance(name, str) else None
    if not isinstance(value, torch.dtype):
        raise ValueError(f"unknown torch dtype {name!r}")
    return value


def _is_bits(dtype: torch.dtype) -> bool:
    """``bits8``, ``bits16``, ``bits1x8``...: opaque bit containers with no defined values."""
    return dtype_name(dtype).startswith("bits")


def storage_dtype(dtype: torch.dtype, where: str) -> str:
    """safetensors name under which tensors of ``dtype`` are stored (``U8`` for raw bytes)."""
    if dtype in TORCH_TO_SAFETENSORS:
        return TORCH_TO_SAFETENSORS[dtype]
    if dtype in _QUANTIZED or _is_bits(dtype) or not _byte_viewable(dtype):
        raise UnsupportedValueError(
            f"{where}: tensors of dtype {dtype} cannot be stored by torchkeep; "
            "dequantize or convert them (e.g. tensor.float()) before saving"
        )
    return "U8"


@functools.cache
def _override_dtypes() -> dict[str, torch.dtype]:
    """Names a file may give as a tensor's real dtype: exactly what :func:`storage_dtype` can
    store (safetensors dtypes, and raw-byte dtypes such as complex128); never quantized or
    ``bits*`` dtypes, which a file could otherwise use to reach operations torch does not
    implement for them."""
    allowed = {}
    for name in dir(torch):
        value = getattr(torch, name)
        if not isinstance(value, torch.dtype) or name != dtype_name(value):
            continue  # not a dtype, or an alias such as torch.float
        if value in TORCH_TO_SAFETENSORS or not (
            value in _QUANTIZED or _is_bits(value) or not _byte_viewable(value)
        ):
            allowed[name] = value
    return allowed


def override_dtype(name: object) -> torch.dtype:
    """The dtype a file's tree names for a raw-byte entry; ``ValueError`` unless it is one
    torchkeep can store (see :func:`_override_dtypes`)."""
    value = _override_dtypes().get(name) if isinstance(name, str) else None
    if value is None:
        raise ValueError(f"dtype {name!r} is not a dtype torchkeep stores")
    return value


def _byte_viewable(dtype: torch.dtype) -> bool:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # deprecation notices of exotic dtypes
            torch.empty(1, dtype=dtype).view(torch.uint8)
    except (RuntimeError, TypeError, NotImplementedError):
        return False
    return True
