"""A sharded checkpoint seen as one checkpoint of full tensors (for inspect, verify, diff,
convert).

Each tensor is a :class:`Ref` whose ``fetch`` assembles the full tensor from its chunks, every
chunk read with its checksum verified and checked against the metadata: one tensor in memory
at a time, so ``convert`` consolidates a model of any size into one file (or HF shards) with
memory for about its largest tensor. The nested structure comes from DCP's flattening map
(``mappings``), so names read as in the saved state (``modules.model.0.weight``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import MetadataIndex, TensorStorageMetadata

from .. import knobs
from ..format import checksum
from ..readers.view import CheckpointView, Ref
from . import metadata as meta
from .check import describe, shard_table, verify_ranks
from .reader import ShardFile

FORMAT = "torchkeep-sharded"


def is_sharded_checkpoint(path: str | os.PathLike) -> bool:
    """True for a directory holding torchkeep's sharded-checkpoint metadata."""
    return os.path.isfile(os.path.join(os.fspath(path), meta.METADATA_FILE))


class ShardedView(CheckpointView):
    """The view of a committed :class:`~torchkeep.distributed.TorchkeepWriter` checkpoint."""

    checksum_algorithm = checksum.ALGORITHM

    def __init__(self, path: str | os.PathLike) -> None:
        path = os.path.abspath(os.fspath(path))
        self.path = path
        self.parsed = meta.read(path)
        self._shards: dict[int, ShardFile] = {}
        self.rank_problems: dict[int, list[str]] | None = None  # set by check()
        self.threads = max(1, min(knobs.IO_THREADS, self.parsed.world_size))
        self._executor: ThreadPoolExecutor | None = None
        try:
            skeleton = self._skeleton(path)
        except BaseException:
            self.close()
            raise
        notes = [f"sharded by {self.parsed.world_size} rank(s); tensors shown whole"]
        super().__init__(path, FORMAT, skeleton, notes)

    def _shard(self, file: int) -> ShardFile:
        if file not in self._shards:
            self._shards[file] = ShardFile(os.path.join(self.path, meta.rank_file(file)))
        return self._shards[file]

    def _skeleton(self, path: str) -> dict:
        metadata = self.parsed.metadata
        mappings = metadata.planner_data or {}
        skeleton: dict = {}
        for fqn, spec in metadata.state_dict_metadata.items():
            if isinstance(spec, TensorStorageMetadata):
                leaf: Any = Ref(fqn, spec.properties.dtype, tuple(spec.size), self._fetcher(fqn))
            else:
                stored = metadata.storage_data[_index(fqn)]
                leaf = self._shard(stored.file).value(stored.name)
            _place(skeleton, [str(p) for p in mappings.get(fqn, (fqn,))], leaf)
        return skeleton

    def _fetcher(self, fqn: str) -> Callable[[], torch.Tensor]:
        def fetch() -> torch.Tensor:
            metadata = self.parsed.metadata
            spec = metadata.state_dict_metadata[fqn]
            assert isinstance(spec, TensorStorageMetadata)
            full = torch.empty(tuple(spec.size), dtype=spec.properties.dtype)
            by_file: dict[int, list] = {}
            for chunk in spec.chunks:
                stored = metadata.storage_data[_index(fqn, chunk.offsets)]
                by_file.setdefault(stored.file, []).append((stored.name, chunk))
            shards = {file: self._shard(file) for file in by_file}  # opened in this thread

            def fill(file: int) -> None:
                shard = shards[file]
                for name, chunk in by_file[file]:
                    region = full
                    for dim, (lo, n) in enumerate(zip(chunk.offsets, chunk.sizes)):
                        region = region.narrow(dim, lo, n)
                    key = shard.direct_key(name, spec, chunk.sizes)
                    if key is not None and region.is_contiguous():
                        shard.reader.read_into(key, region, verify=True)  # no staging copy
                        continue
                    region.copy_(shard.chunk(name, spec, chunk.sizes))
                    shard.cache.clear()

            # The chunks of a sharded tensor lie in different rank files: those are read and
            # verified by several threads at once (disjoint regions of ``full``); peak memory
            # is the tensor plus one chunk per thread.
            if len(by_file) > 1 and self.threads > 1:
                list(self._pool().map(fill, sorted(by_file)))
            else:
                for file in sorted(by_file):
                    fill(file)
            return full

        return fetch

    def _pool(self) -> ThreadPoolExecutor:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(self.threads, thread_name_prefix="torchkeep-cv")
        return self._executor

    def check(self, progress: Callable[[int], None] | None = None) -> list[str]:
        general, self.rank_problems = verify_ranks(self.path)
        if progress is not None:
            progress(self.total_bytes)
        return general + [p for r in sorted(self.rank_problems) for p in self.rank_problems[r]]

    def shard_table(self) -> list[dict]:
        """Which rank wrote what, and each rank file's checksum status (after :meth:`check`)."""
        return shard_table(describe(self.path), self.rank_problems)

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        for shard in self._shards.values():
            shard.close()
        self._shards.clear()


def _index(fqn: str, offsets: Any = None) -> MetadataIndex:
    return MetadataIndex(fqn, offsets)


def _place(tree: dict, path: list[str], leaf: Any) -> None:
    node = tree
    for part in path[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):  # a value and a container under one name: keep both
            child = node[part] = {"": child}
        node = child
    node[path[-1]] = leaf
