"""Stock DCP checkpoints in its safetensors layouts, read without unpickling anything.

torch's ``HuggingFaceStorageWriter`` (``model-*.safetensors``, or per rank
``shard-NNNNN-model-*.safetensors`` with ``save_distributed=True``, which writes no index) and
``FileSystemWriter(serialization_format=SAFETENSORS)`` (``__R_N.distcp`` files beside a pickled
``.metadata``) store each rank's chunks as safetensors entries; the header metadata
``DCP_SHARDING_INFO`` (JSON) gives each chunk's offsets in the global tensor, whose shape is the
chunks' extent. This view reads only those headers (validated like any safetensors header) and
the sharding JSON, so the pickled ``.metadata`` is never needed. Chunks are checked to lie in
bounds, not to overlap and to cover their tensor; a tensor is assembled when fetched, one at a
time, so ``convert`` streams.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import torch

from ..errors import FormatError
from ..format.dtypes import SAFETENSORS_TO_TORCH
from ..storage.paths import plain_name
from ..transfer.reader import FileReader
from .view import CheckpointView, Ref

SHARDING_KEY = "DCP_SHARDING_INFO"
FORMAT = "dcp-safetensors"
#: Most chunks one tensor may have (overlap checks are quadratic in it).
MAX_CHUNKS_PER_TENSOR = 4096
_SUFFIXES = (".safetensors", ".distcp")
_PROBE_BYTES = 1 << 16


@dataclass(frozen=True)
class Chunk:
    file: str
    key: str
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]


def sharded_files(folder: str) -> list[str]:
    """Names of ``folder``'s safetensors/.distcp files whose header carries DCP sharding info."""
    found = []
    for name in sorted(os.listdir(folder)):
        if not name.endswith(_SUFFIXES):
            continue
        path = os.path.join(folder, name)
        if os.path.islink(path) or not os.path.isfile(path):
            continue
        with open(path, "rb") as f:
            head = f.read(_PROBE_BYTES)
        if len(head) > 8 and head[8:9] == b"{" and SHARDING_KEY.encode() in head:
            found.append(name)
    return found


def _offsets(info: object, key: str, ndim: int, where: str) -> tuple[int, ...]:
    entry = info.get(key) if isinstance(info, dict) else None
    offsets = entry.get("saved_offsets") if isinstance(entry, dict) else None
    if not (
        isinstance(offsets, list)
        and len(offsets) == ndim
        and all(type(o) is int and 0 <= o < 2**62 for o in offsets)
    ):
        raise FormatError(
            f"{where}: {SHARDING_KEY} gives no valid saved_offsets for {key!r} "
            f"(need {ndim} non-negative ints)"
        )
    return tuple(offsets)


class DcpSafetensorsView(CheckpointView):
    """Full tensors of a stock DCP checkpoint in a safetensors layout (tensors only)."""

    def __init__(self, folder: str, files: list[str] | None = None) -> None:
        self.folder = folder
        self.readers: dict[str, FileReader] = {}
        try:
            names = sharded_files(folder) if files is None else files
            if not names:
                raise FormatError(f"{folder}: no safetensors file with {SHARDING_KEY} metadata")
            chunks, dtypes = self._index(names)
            skeleton = {fqn: self._ref(fqn, parts, dtypes[fqn]) for fqn, parts in chunks.items()}
        except BaseException:
            self.close()
            raise
        notes = [f"stock DCP safetensors layout: {len(names)} file(s); tensors shown whole"]
        super().__init__(folder, FORMAT, skeleton, notes)

    def _index(self, names: list[str]) -> tuple[dict[str, list[Chunk]], dict[str, torch.dtype]]:
        chunks: dict[str, list[Chunk]] = {}
        dtypes: dict[str, torch.dtype] = {}
        for name in names:
            where = os.path.join(self.folder, plain_name(name, self.folder))
            reader = self.readers[name] = FileReader(where, follow_symlinks=False)
            try:
                info = json.loads(reader.metadata.get(SHARDING_KEY, "null"))
            except ValueError as exc:
                raise FormatError(f"{where}: {SHARDING_KEY} is not JSON ({exc})") from exc
            for key in sorted(reader.keys()):
                entry = reader.entry(key)
                dtype = SAFETENSORS_TO_TORCH[entry.dtype]
                if dtypes.setdefault(key, dtype) != dtype:
                    raise FormatError(f"{where}: chunks of {key!r} have different dtypes")
                offsets = _offsets(info, key, len(entry.shape), where)
                chunks.setdefault(key, []).append(Chunk(name, key, offsets, tuple(entry.shape)))
        for fqn, parts in chunks.items():
            _check_cover(fqn, parts, self.folder)
        return chunks, dtypes

    def _ref(self, fqn: str, parts: list[Chunk], dtype: torch.dtype) -> Ref:
        shape = _extent(parts)

        def fetch() -> torch.Tensor:
            out = torch.empty(shape, dtype=dtype)
            for part in parts:
                region = out
                for dim, (lo, n) in enumerate(zip(part.offsets, part.sizes)):
                    region = region.narrow(dim, lo, n)
                region.copy_(self.readers[part.file].read_entry(part.key))
            return out

        return Ref(fqn, dtype, shape, fetch)

    def close(self) -> None:
        for reader in self.readers.values():
            reader.close()
        self.readers.clear()


def _extent(parts: list[Chunk]) -> tuple[int, ...]:
    return tuple(max(p.offsets[d] + p.sizes[d] for p in parts) for d in range(len(parts[0].sizes)))


def _check_cover(fqn: str, parts: list[Chunk], folder: str) -> None:
    """Chunks of one tensor: same rank, at most MAX_CHUNKS_PER_TENSOR, disjoint, covering."""
    where = f"{folder}: tensor {fqn!r}"
    if len(parts) > MAX_CHUNKS_PER_TENSOR:
        raise FormatError(f"{where}: {len(parts)} chunks (at most {MAX_CHUNKS_PER_TENSOR})")
    if len({len(p.sizes) for p in parts}) != 1:
        raise FormatError(f"{where}: chunks of different ranks (number of dimensions)")
    shape = _extent(parts)
    for i, a in enumerate(parts):
        for b in parts[i + 1 :]:
            if all(
                max(x, y) < min(x + n, y + m)
                for x, n, y, m in zip(a.offsets, a.sizes, b.offsets, b.sizes)
            ):
                raise FormatError(
                    f"{where}: chunks at {list(a.offsets)} ({a.file}) and {list(b.offsets)} "
                    f"({b.file}) overlap"
                )
    covered = sum(math.prod(p.sizes) for p in parts)
    if covered != math.prod(shape):
        raise FormatError(
            f"{where}: chunks cover {covered} of {math.prod(shape)} elements of shape "
            f"{list(shape)} (a shard file is missing?)"
        )
