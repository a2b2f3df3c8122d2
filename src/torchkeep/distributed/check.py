"""Inspect and verify a sharded checkpoint without loading it into a model.

``describe`` reports what the validated metadata says: global shapes and dtypes, every chunk
with the rank that wrote it, the non-tensor values, the files and their sizes. ``verify``
checks everything a load would, for every rank file at once: the metadata, each file's header,
every tensor's checksum, that each chunk is stored with the shape and dtype the metadata
promises, and that the non-tensor values and rank states decode. Both are the building blocks
for the CLI's ``inspect`` and ``verify`` of sharded steps.
"""

from __future__ import annotations

import math
import os
from typing import Any

from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from ..errors import CorruptionError, FormatError, StateDictMismatchError
from ..format.dtypes import dtype_from_name
from . import metadata as meta
from .reader import ShardFile


def describe(path: str | os.PathLike) -> dict[str, Any]:
    """A JSON-ready summary of the checkpoint at ``path`` (raises FormatError if hostile)."""
    path = os.path.abspath(os.fspath(path))
    parsed = meta.read(path)
    doc = parsed.doc
    files = [
        {"rank": r, "name": name, "bytes": os.path.getsize(os.path.join(path, name))}
        for r, name in enumerate(parsed.files)
    ]
    tensors = {
        fqn: {
            "dtype": spec["dtype"],
            "shape": spec["shape"],
            "chunks": [
                {"offsets": c["offsets"], "sizes": c["sizes"], "rank": c["file"]}
                for c in spec["chunks"]
            ],
        }
        for fqn, spec in doc["tensors"].items()
    }
    values = {fqn: spec["file"] for fqn, spec in doc["values"].items()}
    return {
        "path": path,
        "format": "torchkeep-sharded",
        "world_size": parsed.world_size,
        "files": files,
        "tensors": tensors,
        "values": values,
        "rank_state": parsed.rank_state,
    }


def verify(path: str | os.PathLike) -> list[str]:
    """Every problem found in the checkpoint at ``path`` (empty when it is sound)."""
    general, by_rank = verify_ranks(path)
    return general + [p for rank in sorted(by_rank) for p in by_rank[rank]]


def verify_ranks(path: str | os.PathLike) -> tuple[list[str], dict[int, list[str]]]:
    """Problems of the metadata, and of each rank's file (rank -> problems, [] when sound)."""
    path = os.path.abspath(os.fspath(path))
    try:
        parsed = meta.read(path)
    except FormatError as exc:
        return [str(exc)], {}
    by_rank: dict[int, list[str]] = {}
    for rank, name in enumerate(parsed.files):
        try:
            shard = ShardFile(os.path.join(path, name))
        except (FormatError, CorruptionError, OSError) as exc:
            by_rank[rank] = [str(exc)]
            continue
        try:
            by_rank[rank] = _check_shard(shard, rank, parsed)
        finally:
            shard.close()
    return [], by_rank


def shard_table(described: dict[str, Any], by_rank: dict[int, list[str]] | None) -> list[dict]:
    """Per rank file: what it holds (chunks, values, bytes) and its checksum status."""
    rows = []
    for entry in described["files"]:
        rank = entry["rank"]
        chunks = [
            (fqn, c["sizes"], spec["dtype"])
            for fqn, spec in described["tensors"].items()
            for c in spec["chunks"]
            if c["rank"] == rank
        ]
        problems = None if by_rank is None else by_rank.get(rank, [])
        rows.append(
            {
                "rank": rank,
                "file": entry["name"],
                "bytes": entry["bytes"],
                "chunks": len(chunks),
                "tensors": sorted({fqn for fqn, _s, _d in chunks}),
                "tensor_bytes": sum(_nbytes(sizes, dtype) for _f, sizes, dtype in chunks),
                "values": sorted(k for k, r in described["values"].items() if r == rank),
                "rank_state": rank in described["rank_state"],
                "status": "not checked" if problems is None else "corrupt" if problems else "ok",
                "problems": problems or [],
            }
        )
    return rows


def _nbytes(sizes: list[int], dtype: str) -> int:
    return math.prod(sizes) * dtype_from_name(dtype).itemsize


def _check_shard(shard: ShardFile, rank: int, parsed: meta.Parsed) -> list[str]:
    problems = [
        f"{shard.path}: tensor {key!r} is corrupt (checksum mismatch)"
        for key in shard.reader.corrupt_entries()
    ]
    metadata = parsed.metadata
    for index, stored in metadata.storage_data.items():
        if stored.file != rank:
            continue
        spec = metadata.state_dict_metadata[index.fqn]
        try:
            if isinstance(spec, TensorStorageMetadata):
                sizes = next(c.sizes for c in spec.chunks if c.offsets == index.offset)
                if shard.direct_key(stored.name, spec, sizes) is None:
                    shard.chunk(stored.name, spec, sizes)
                    shard.cache.clear()
            else:
                shard.value(stored.name)
        except (FormatError, CorruptionError) as exc:
            problems.append(str(exc))
    if rank in parsed.rank_state:
        try:
            if not isinstance(shard.decode(shard.rank_state_node, "rank state"), dict):
                raise StateDictMismatchError(f"{shard.path}: the rank state is not a dict")
        except (FormatError, CorruptionError, StateDictMismatchError) as exc:
            problems.append(str(exc))
    return problems
