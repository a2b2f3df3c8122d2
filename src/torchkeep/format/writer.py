"""Write a torchkeep file: header with fixed-width checksum placeholders, data, final header.

The checksums live in the header, but the header must precede the data. Checksums are fixed
width, so the header's length is known before any data is hashed: the data is written (and
hashed in the same pass, chunk by chunk, while a thread pool writes the previous chunks), then
the final header, identical in length, is written over the placeholder.
"""

from __future__ import annotations

import json
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from .. import knobs
from ..errors import UnsupportedValueError
from ..storage.io import FileOps, write_all
from . import checksum, header
from .layout import Entry, plan_entries
from .tree import encode


@dataclass
class PreparedFile:
    """Everything needed to write one file; building it validates the object (no I/O yet)."""

    entries: list[Entry]
    tree: Any
    user_metadata: dict[str, str]

    @property
    def data_bytes(self) -> int:
        return self.entries[-1].end if self.entries else 0

    def header_bytes(self, sums: dict[str, str] | None = None) -> bytes:
        """Serialized header; placeholders for the checksums when ``sums`` is None."""
        final = sums is not None
        if sums is None:
            sums = {e.key: checksum.PLACEHOLDER for e in self.entries}
        entries = {
            e.key: {"dtype": e.st_dtype, "shape": e.shape, "data_offsets": [e.begin, e.end]}
            for e in self.entries
        }
        meta = {
            header.META_FORMAT: "pt",
            **self.user_metadata,
            header.META_VERSION: header.FORMAT_VERSION,
            header.META_TREE: json.dumps(self.tree, separators=(",", ":"), allow_nan=False),
            header.META_CHECKSUMS: json.dumps(
                {"algorithm": checksum.ALGORITHM, "tensors": sums}, separators=(",", ":")
            ),
        }
        meta[header.META_HEADER_SUM] = (
            header.header_digest(entries, meta) if final else checksum.PLACEHOLDER
        )
        return header.encode_header(entries, meta)

    @property
    def total_bytes(self) -> int:
        return len(self.header_bytes()) + self.data_bytes


def prepare(obj: Any, metadata: dict[str, str] | None = None) -> PreparedFile:
    """Encode ``obj`` and plan its entries; raises before anything touches the disk."""
    user = dict(metadata or {})
    for key, value in user.items():
        if not (isinstance(key, str) and isinstance(value, str)):
            raise UnsupportedValueError(f"metadata[{key!r}]: metadata must map str to str")
        if key.startswith("torchkeep.") or key == header.META_FORMAT:
            raise UnsupportedValueError(f"metadata[{key!r}]: this key is reserved by torchkeep")
    tree, leaves = encode(obj)
    return PreparedFile(plan_entries(leaves), tree, user)


def byte_view(t: torch.Tensor) -> memoryview:
    """Zero-copy byte view of a contiguous CPU tensor."""
    flat = t.reshape(-1)
    if flat.dtype != torch.uint8:
        flat = flat.view(torch.uint8)
    return memoryview(flat.numpy())


def _host_source(entry: Entry) -> torch.Tensor:
    source = entry.source
    if source.device.type != "cpu":
        source = source.to("cpu")
    return source


def write_prepared(prepared: PreparedFile, fd: int, ops: FileOps) -> dict[str, str]:
    """Write header placeholder, data and final header to ``fd``; returns the checksums."""
    placeholder = prepared.header_bytes()
    data_start = len(placeholder)
    write_all(ops, fd, memoryview(placeholder), 0)
    sums: dict[str, str] = {}
    pending: deque[Future] = deque()
    limit = max(2, 2 * knobs.IO_THREADS)
    with ThreadPoolExecutor(max_workers=max(1, knobs.IO_THREADS)) as pool:
        try:
            for entry in prepared.entries:
                view = byte_view(_host_source(entry))
                hasher = checksum.new_hasher()
                for lo in range(0, view.nbytes, knobs.CHUNK_BYTES):
                    chunk = view[lo : lo + knobs.CHUNK_BYTES]
                    hasher.update(chunk)
                    while len(pending) >= limit:
                        pending.popleft().result()
                    pending.append(
                        pool.submit(write_all, ops, fd, chunk, data_start + entry.begin + lo)
                    )
                sums[entry.key] = hasher.hexdigest()
            while pending:
                pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()
    final = prepared.header_bytes(sums)
    if len(final) != data_start:  # fixed-width fields make this impossible; guard anyway
        raise AssertionError("torchkeep header changed length between placeholder and final")
    write_all(ops, fd, memoryview(final), 0)
    return sums
