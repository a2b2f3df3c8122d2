"""Plan which bytes go into the file: one entry per distinct storage region, aliases for the rest.

Tensors that are the same view of the same storage (tied embeddings) become one entry that every
node refers to. Tensors that are different views of one storage (a slice of a weight) are written
once as the covering region; their nodes record ``view`` = shape/stride/offset into that entry.
Views whose dtypes differ fall back to independent entries (sharing is then not preserved).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .dtypes import TORCH_TO_SAFETENSORS, dtype_name, storage_dtype
from .tree import RESERVED_KEYS, TensorLeaf, claim_key


@dataclass(slots=True)
class Entry:
    """One tensor entry of the safetensors header and the memory it is written from."""

    key: str
    st_dtype: str
    shape: list[int]
    source: torch.Tensor  # contiguous, on any device; bytes are taken from here
    align: int = 1  # element size of the real dtype; entries are ordered by it
    begin: int = 0
    end: int = 0
    #: Checksum of the bytes at ``source``, when whoever put them there computed it on the way
    #: (an overlapped snapshot hashes while it copies); writers then skip their own pass.
    checksum: str | None = None

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def plan_entries(leaves: list[TensorLeaf]) -> list[Entry]:
    """Group tensors by storage, fill in each leaf's node, and order entries by alignment."""
    groups: dict[tuple, list[TensorLeaf]] = {}
    for leaf in leaves:
        t = leaf.tensor
        if t.numel() == 0 or t.is_conj() or t.is_neg():
            # Lazy conjugate/negative views are materialized: they cannot alias their base.
            groups[("own", id(leaf))] = [leaf]
        else:
            # The storage's address, without building a storage object per tensor (hot path).
            base = t.data_ptr() - t.storage_offset() * t.element_size()
            groups.setdefault((t.is_cuda, t.get_device(), base), []).append(leaf)
    taken = set(RESERVED_KEYS) | {leaf.key for leaf in leaves}
    entries: list[Entry] = []
    for group in groups.values():
        entries.extend(_plan_group(group, taken))
    entries.sort(key=lambda e: -e.align)  # stable: keeps encounter order per size
    offset = 0
    for entry in entries:
        entry.begin = offset
        offset += entry.source.numel() * entry.source.element_size()
        entry.end = offset
    return entries


def _view_sig(t: torch.Tensor) -> tuple:
    return (t.dtype, tuple(t.shape), t.stride(), t.storage_offset())


def _plan_group(group: list[TensorLeaf], taken: set[str]) -> list[Entry]:
    first = group[0]
    if len(group) == 1 or all(_view_sig(leaf.tensor) == _view_sig(first.tensor) for leaf in group):
        entry = _whole_entry(first)
        for leaf in group:
            _point(leaf, entry)
        return [entry]
    if len({leaf.tensor.dtype for leaf in group}) > 1:
        return [e for leaf in group for e in _plan_group([leaf], taken)]
    return [_region_entry(group, taken)]


def _whole_entry(leaf: TensorLeaf) -> Entry:
    t = leaf.tensor
    if t.requires_grad:
        t = t.detach()
    if t.is_conj() or t.is_neg():
        t = t.resolve_conj().resolve_neg()
    st = TORCH_TO_SAFETENSORS.get(t.dtype) or storage_dtype(t.dtype, leaf.path or "<root>")
    source = t.contiguous()
    shape = list(t.shape)
    if st == "U8" and t.dtype != torch.uint8:
        source = source.reshape(-1).view(torch.uint8)
        shape = [source.numel()]
    return Entry(leaf.key, st, shape, source, align=t.element_size())


def _point(leaf: TensorLeaf, entry: Entry, view: dict | None = None) -> None:
    leaf.node["key"] = entry.key
    t = leaf.tensor
    if entry.st_dtype == "U8" and t.dtype != torch.uint8:
        leaf.node["dtype"] = dtype_name(t.dtype)
        if view is None:
            leaf.node["shape"] = list(t.shape)
    if view is not None:
        leaf.node["view"] = view


def _span(t: torch.Tensor) -> tuple[int, int]:
    # int(): torch types these as int | SymInt (symbolic under tracing); saving is eager.
    start = int(t.storage_offset())
    end = start + sum((n - 1) * s for n, s in zip(t.shape, t.stride())) + 1
    return start, end


def _region_entry(group: list[TensorLeaf], taken: set[str]) -> Entry:
    spans = [_span(leaf.tensor) for leaf in group]
    lo = min(s[0] for s in spans)
    hi = max(s[1] for s in spans)
    cover = next(
        (
            leaf
            for leaf, span in zip(group, spans)
            if span == (lo, hi) and leaf.tensor.is_contiguous()
        ),
        None,
    )
    if cover is not None:
        entry = _whole_entry(cover)
    else:
        first = group[0]
        region = first.tensor.detach().as_strided((hi - lo,), (1,), lo)
        key = claim_key(taken, f"{first.key}.__storage__")
        entry = _whole_entry(TensorLeaf(key, first.path, region))
    for leaf in group:
        t = leaf.tensor
        if cover is not None and _view_sig(t) == _view_sig(cover.tensor):
            _point(leaf, entry)
            continue
        view = {
            "shape": list(t.shape),
            "stride": list(t.stride()),
            "offset": t.storage_offset() - lo,
        }
        _point(leaf, entry, view)
    return entry
