"""Which tensors of a training state an overlapped snapshot may copy after ``save`` returns.

Parameters and optimizer state change only in ``optimizer.step()`` (which waits for the copy,
``transfer/overlap.py``); everything else - module buffers (BatchNorm statistics change in
forward), RNG and data-loader state, plain values - is copied before ``save`` returns. An
entry is deferred when its bytes are the memory of a parameter or an optimizer state tensor
(same address and size), so a copy made while planning (a non-contiguous view) is never
mistaken for live memory it no longer aliases.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from ..format.layout import Entry


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, nn.Module):
        return list(value.parameters())
    if isinstance(value, torch.optim.Optimizer):
        found = [p for group in value.param_groups for p in group["params"]]
        for slot in value.state.values():
            found += [t for t in slot.values() if isinstance(t, torch.Tensor)]
        return found
    return []


def _spans(tensors: list[torch.Tensor]) -> set[tuple[int, int]]:
    return {(t.data_ptr(), t.numel() * t.element_size()) for t in tensors if t.numel()}


def _matcher(spans: set[tuple[int, int]]) -> Callable[[Entry], bool]:
    def defer(entry: Entry) -> bool:
        source = entry.source
        if not source.numel():
            return False
        return (source.data_ptr(), source.numel() * source.element_size()) in spans

    return defer


def deferrable(state: Mapping[str, Any]) -> Callable[[Entry], bool]:
    """A predicate: does this entry's memory belong to a parameter or optimizer state?"""
    return _matcher(_spans([t for value in state.values() for t in _tensors(value)]))


def skippable(state: Mapping[str, Any]) -> Callable[[Entry], bool]:
    """A predicate: may an incremental step skip this entry when its version is unchanged?

    Only module parameters that no optimizer of the state updates (frozen layers, EMA
    teachers). Buffers are excluded because BatchNorm updates its running statistics without
    bumping their version counter, and optimizer-owned tensors because fused optimizers
    (``fused=True``) update parameters and state without bumping it either.
    """
    params: list[torch.Tensor] = []
    owned: list[torch.Tensor] = []
    for value in state.values():
        if isinstance(value, nn.Module):
            params += list(value.parameters())
        elif isinstance(value, torch.optim.Optimizer):
            owned += _tensors(value)
    return _matcher(_spans(params) - _spans(owned))
