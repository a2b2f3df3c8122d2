"""Mapping between torch dtypes and the dtype names of the safetensors format.

Dtypes that safetensors cannot name (complex128, float8_e8m0fnu, ...) are stored as raw ``U8``
bytes; the typed tree records the real dtype so torchkeep restores it exactly.
"""

from __future__ import annotations

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


def storage_dtype(dtype: torch.dtype, where: str) -> str:
    """safetensors name under which tensors of ``dtype`` are stored (``U8`` for raw bytes)."""
    if dtype in TORCH_TO_SAFETENSORS:
        return TORCH_TO_SAFETENSORS[dtype]
    if dtype in _QUANTIZED or not _byte_viewable(dtype):
        raise UnsupportedValueError(
            f"{where}: tensors of dtype {dtype} cannot be stored by torchkeep; "
            "dequantize or convert them (e.g. tensor.float()) before saving"
        )
    return "U8"


def _byte_viewable(dtype: torch.dtype) -> bool:
    try:
        torch.empty(1, dtype=dtype).view(torch.uint8)
    except (RuntimeError, TypeError):
        return False
    return True
