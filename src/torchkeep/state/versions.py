"""Incremental steps: which tensors did not change since the manager's previous step.

After each committed step the manager remembers, per entry key, the tensor the bytes came from
(a reference, which keeps its memory alive so its address cannot be reused by another tensor),
its ``_version`` counter and address at save time, and where the bytes now live (step, offset,
checksum). At the next save an entry whose tensor has the same address, version, dtype and
shape is not written again: the new file refers to the earlier step's bytes instead
(``storage/references.py``). ``verify_unchanged=True`` hashes such a tensor and writes it after
all (with a warning) when its bytes differ from the stored checksum: the version counter does
not see writes through ``.data`` or from C extensions.

The memory is per manager and per process: the first save after a restart writes everything.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..format import checksum
from ..format.layout import Entry
from ..format.memory import byte_view
from ..storage.references import REFS_KEY, TensorRef, encode_refs
from ..transfer.writer import PreparedFile


@dataclass
class _Held:
    live: torch.Tensor  # keeps the storage alive: an equal address means the same memory
    version: int
    ptr: int
    ref: TensorRef


@dataclass
class Plan:
    """One save's incremental decision: the file to write and what to remember afterwards."""

    prepared: PreparedFile
    refs: dict[str, TensorRef]
    seen: dict[str, tuple[torch.Tensor, int, int]]  # every entry key -> (live, version, ptr)
    skipped_bytes: int = 0


def _signature(entry: Entry) -> tuple[torch.Tensor, int, int]:
    source = entry.source
    return source, source._version, source.data_ptr()


def _digest(source: torch.Tensor) -> str:
    flat = source.detach().reshape(-1)
    if flat.dtype != torch.uint8:
        flat = flat.view(torch.uint8)
    return checksum.digest(byte_view(flat.cpu()))


class Baseline:
    """What the previous committed step of one manager holds, entry by entry."""

    def __init__(self) -> None:
        self.held: dict[str, _Held] = {}

    def plan(
        self,
        prepared: PreparedFile,
        existing: set[int],
        skippable: Callable[[Entry], bool],
        verify_unchanged: bool,
        where: str,
    ) -> Plan:
        """Drop the ``skippable`` entries unchanged since the previous step (bytes held by a
        step in ``existing``) from ``prepared``; call before the snapshot replaces sources."""
        seen = {e.key: _signature(e) for e in prepared.entries}
        refs: dict[str, TensorRef] = {}
        kept: list[Entry] = []
        for entry in prepared.entries:
            ref = self._unchanged(entry, seen[entry.key], existing) if skippable(entry) else None
            if ref is not None and verify_unchanged and _digest(entry.source) != ref.checksum:
                warnings.warn(
                    f"{where}: tensor {entry.key!r} changed without a version-counter bump "
                    "(a write through .data or a C extension?); written in full",
                    stacklevel=4,
                )
                ref = None
            if ref is None:
                kept.append(entry)
            else:
                refs[entry.key] = ref
        if not refs:
            return Plan(prepared, refs, seen)
        offset = 0
        for entry in kept:  # entries keep their alignment order; only their offsets move
            size = entry.end - entry.begin
            entry.begin, entry.end = offset, offset + size
            offset += size
        metadata = {**prepared.user_metadata, REFS_KEY: encode_refs(refs)}
        smaller = PreparedFile(kept, prepared.tree, metadata)
        smaller.header_bytes()
        skipped = sum(r.nbytes for r in refs.values())
        return Plan(smaller, refs, seen, skipped)

    def _unchanged(
        self, entry: Entry, now: tuple[torch.Tensor, int, int], existing: set[int]
    ) -> TensorRef | None:
        held = self.held.get(entry.key)
        if held is None or held.ref.step not in existing:
            return None
        source, version, ptr = now
        same = (
            ptr == held.ptr
            and version == held.version
            and source.dtype == held.live.dtype
            and source.shape == held.live.shape
            and source.device == held.live.device
            and entry.nbytes == held.ref.nbytes
            and entry.st_dtype == held.ref.dtype
        )
        return held.ref if same else None

    def commit(self, plan: Plan, step: int, sums: dict[str, str]) -> None:
        """Remember the step just committed: its own entries and the references it kept."""
        held: dict[str, _Held] = {}
        for entry in plan.prepared.entries:
            live, version, ptr = plan.seen[entry.key]
            ref = TensorRef(
                step,
                entry.key,
                entry.st_dtype,
                tuple(entry.shape),
                entry.begin,
                entry.nbytes,
                sums[entry.key],
            )
            held[entry.key] = _Held(live, version, ptr, ref)
        for key, ref in plan.refs.items():
            live, version, ptr = plan.seen[key]
            held[key] = _Held(live, version, ptr, ref)
        self.held = held

    def forget(self) -> None:
        """Drop everything (the next step is written in full)."""
        self.held = {}
