"""Deep, type-exact comparison used by the round-trip tests."""

from __future__ import annotations

import collections
import math
from typing import Any

import numpy as np
import torch


def same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise-equal content, same dtype, shape, device and tensor type."""
    if type(a) is not type(b) or a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.device != b.device or a.requires_grad != b.requires_grad:
        return False
    a, b = a.detach().cpu().contiguous(), b.detach().cpu().contiguous()
    if a.numel() == 0:
        return True
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def assert_same(a: Any, b: Any, path: str = "") -> None:
    """Assert ``b`` equals ``a`` in value and exact Python type, recursively."""
    where = path or "<root>"
    assert type(a) is type(b), f"{where}: {type(a)} != {type(b)}"
    if isinstance(a, torch.Tensor):
        assert same_tensor(a, b), f"{where}: tensors differ ({a!r} vs {b!r})"
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape, f"{where}: array meta differs"
        assert a.tobytes() == b.tobytes(), f"{where}: array bytes differ"
    elif isinstance(a, np.generic):
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes(), f"{where}: {a!r} != {b!r}"
    elif isinstance(a, float):
        assert (math.isnan(a) and math.isnan(b)) or a == b, f"{where}: {a} != {b}"
        assert math.copysign(1, a) == math.copysign(1, b), f"{where}: sign of zero differs"
    elif isinstance(a, dict):
        assert list(a) == list(b), f"{where}: keys {list(a)} != {list(b)}"
        for key in a:
            assert type(key) is type(next(k for k in b if k == key)), f"{where}: key type {key!r}"
            assert_same(a[key], b[key], f"{path}[{key!r}]")
        if isinstance(a, collections.OrderedDict) and hasattr(a, "_metadata"):
            assert_same(a._metadata, b._metadata, f"{path}._metadata")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{where}: length {len(a)} != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"
