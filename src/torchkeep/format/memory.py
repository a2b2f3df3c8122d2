"""Zero-copy views of tensor memory for writing and hashing."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .layout import Entry


def byte_view(t: torch.Tensor) -> memoryview:
    """Zero-copy byte view of a contiguous CPU tensor."""
    try:  # fast path (~1 us): numpy-representable dtypes
        return _buffer(t.numpy()).cast("B")
    except (TypeError, RuntimeError, ValueError):
        flat = t.reshape(-1)
        if flat.dtype != torch.uint8:
            flat = flat.view(torch.uint8)
        return _buffer(flat.numpy())


def _buffer(array: np.ndarray) -> memoryview:
    # numpy's stubs declare ndarray.__buffer__ only for Python >= 3.12, so the checker, run for
    # 3.10, does not see that every ndarray exports the buffer protocol.
    return memoryview(array)  # type: ignore[arg-type]


def host_source(entry: Entry) -> torch.Tensor:
    """A CPU tensor with ``entry``'s bytes: its source, or a host copy of a device tensor."""
    source = entry.source
    if not source.is_cpu:
        source = source.to("cpu")
    return source


def small_buffer(t: torch.Tensor) -> Any:
    """The bytes of a small contiguous CPU tensor as a buffer: its NumPy array where one exists
    (half the cost of a cast byte view; xxhash and ``pwritev`` take any buffer)."""
    try:
        return t.numpy()
    except (TypeError, RuntimeError, ValueError):
        return byte_view(t)
