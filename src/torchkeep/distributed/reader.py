"""DCP ``StorageReader`` for torchkeep sharded checkpoints: JSON metadata, verified chunks.

``read_metadata`` parses and validates ``checkpoint.json`` (``metadata.py``); DCP plans which
stored chunk regions each rank needs (this is where resharding happens) and ``read_data``
serves them: every chunk is read with its checksum verified, checked against the shape and
dtype the metadata promised, and copied into the destination. A chunk that lands whole in a
contiguous CPU destination is read straight into it. Non-tensor values come from the typed
tree and are handed to the planner as objects; nothing is ever unpickled.
"""

from __future__ import annotations

import io
import os
from collections import defaultdict
from typing import Any

import torch
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner, ReadItem
from torch.distributed.checkpoint.storage import StorageReader
from torch.futures import Future

from ..errors import FormatError
from ..format.dtypes import SAFETENSORS_TO_TORCH
from ..format.tree import TAG
from ..format.tree_decode import decode
from ..transfer.reader import FileReader, materialize, restore_flags
from . import metadata as meta
from .writer import RANK_STATE, TENSORS, VALUES

_PLAIN_NODE_KEYS = frozenset({TAG, "key", "param", "requires_grad"})


class ShardFile:
    """One opened rank file: its reader and the three subtrees of its typed tree."""

    def __init__(self, path: str, storage_options: dict | None = None) -> None:
        self.path = path
        # no symlink: a link could leave the directory
        self.reader = FileReader(path, storage_options, follow_symlinks=False)
        tree = self.reader.tree
        top = tree.get("v") if isinstance(tree, dict) and tree.get(TAG) == "dict" else None
        if not isinstance(top, dict):
            self.reader.close()
            raise FormatError(f"{path}: not a torchkeep shard file (its typed tree has no root)")
        self.tensors = _subtree(top.get(TENSORS), path, "tensor chunks")
        self.values = _subtree(top.get(VALUES), path, "values")
        self.rank_state_node = top.get(RANK_STATE)
        self.cache: dict[str, torch.Tensor] = {}

    def node(self, name: str) -> dict:
        node = self.tensors.get(name)
        if not isinstance(node, dict) or node.get(TAG) != "tensor":
            raise FormatError(f"{self.path}: has no tensor chunk named {name!r}")
        return node

    def chunk(self, name: str, expect: TensorStorageMetadata, sizes: torch.Size) -> torch.Tensor:
        """The whole stored chunk ``name`` (verified, cached), checked against the metadata."""
        if name not in self.cache:
            node = self.node(name)
            entry = self.reader.read_entry(_key(node, self.path, name))
            tensor = materialize(node, entry, self.path, name)
            _check_chunk(tensor, expect, sizes, self.path, name)
            self.cache[name] = tensor
        return self.cache[name]

    def direct_key(self, name: str, expect: TensorStorageMetadata, sizes: torch.Size) -> str | None:
        """The entry key when chunk ``name`` is stored as one plain entry of the right shape."""
        node = self.node(name)
        if not set(node) <= _PLAIN_NODE_KEYS:
            return None
        key = _key(node, self.path, name)
        info = self.reader.entry(key)
        dtype = expect.properties.dtype
        if tuple(info.shape) != tuple(sizes) or SAFETENSORS_TO_TORCH[info.dtype] != dtype:
            raise FormatError(
                f"{self.path}: chunk {name!r} is stored as {info.dtype}{list(info.shape)} but the "
                f"metadata says {dtype}{list(sizes)}"
            )
        return key

    def value(self, fqn: str) -> Any:
        if fqn not in self.values:
            raise FormatError(f"{self.path}: has no value named {fqn!r}")
        return self.decode(self.values[fqn], fqn)

    def decode(self, node: Any, where: str) -> Any:
        def resolve(tnode: dict, path: str) -> torch.Tensor:
            entry = self.reader.read_entry(_key(tnode, self.path, path))
            return restore_flags(tnode, materialize(tnode, entry, self.path, path))

        return decode(node, resolve, f"{self.path}: {where}")

    def close(self) -> None:
        self.cache.clear()
        self.reader.close()


def _key(node: dict, path: str, name: str) -> str:
    key = node.get("key")
    if not isinstance(key, str):
        raise FormatError(f"{path}: chunk {name!r} has no entry key")
    return key


def _subtree(node: Any, path: str, what: str) -> dict:
    if node is None:
        return {}
    if not isinstance(node, dict) or node.get(TAG) != "dict" or not isinstance(node.get("v"), dict):
        raise FormatError(f"{path}: the {what} of a shard file must be a string-keyed dict")
    return node["v"]


def _check_chunk(
    tensor: torch.Tensor, expect: TensorStorageMetadata, sizes: torch.Size, path: str, name: str
) -> None:
    if tuple(tensor.shape) != tuple(sizes) or tensor.dtype != expect.properties.dtype:
        raise FormatError(
            f"{path}: chunk {name!r} holds {tensor.dtype}{list(tensor.shape)} but the metadata "
            f"says {expect.properties.dtype}{list(sizes)}"
        )


class TorchkeepReader(StorageReader):
    """Read a checkpoint written by :class:`TorchkeepWriter`, at any world size."""

    def __init__(
        self, path: str | os.PathLike | None = None, storage_options: dict | None = None
    ) -> None:
        super().__init__()
        self.storage_options = storage_options
        self.path = meta.target_path(path) if path is not None else None
        self.parsed: meta.Parsed | None = None

    @property
    def checkpoint_id(self) -> str | None:
        return self.path

    def reset(self, checkpoint_id: str | os.PathLike | None = None) -> None:
        if checkpoint_id is not None:
            self.path = meta.target_path(checkpoint_id)
        self.parsed = None

    def read_metadata(self) -> Metadata:
        if self.path is None:
            raise FormatError("TorchkeepReader needs a path (or dcp.load(checkpoint_id=...))")
        self.parsed = meta.read(self.path, self.storage_options)
        return self.parsed.metadata

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *a: Any, **k: Any):
        self.metadata = metadata
        self.is_coordinator = is_coordinator

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike) -> bool:
        return os.path.isfile(os.path.join(os.fspath(checkpoint_id), meta.METADATA_FILE))

    def open_shard(self, file: int) -> ShardFile:
        """Open shard file number ``file`` of the checkpoint (one per saving rank)."""
        assert self.path is not None
        return ShardFile(meta.join(self.path, meta.rank_file(file)), self.storage_options)

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        """Serve every read item of ``plan``, one shard file at a time."""
        by_file: dict[int, list[ReadItem]] = defaultdict(list)
        for item in plan.items:
            by_file[self._stored(item).file].append(item)
        for file, items in sorted(by_file.items()):
            shard = self.open_shard(file)
            try:
                self._read_file(shard, items, planner)
            finally:
                shard.close()
        future: Future[None] = Future()
        future.set_result(None)
        return future

    def _stored(self, item: ReadItem) -> meta.Stored:
        stored = self.metadata.storage_data.get(item.storage_index)
        if not isinstance(stored, meta.Stored):
            raise FormatError(f"{self.path}: no stored chunk for {item.storage_index}")
        return stored

    def _read_file(self, shard: ShardFile, items: list[ReadItem], planner: LoadPlanner) -> None:
        direct: list[tuple[str, torch.Tensor]] = []
        done: list[tuple[ReadItem, torch.Tensor]] = []
        named = sorted(((self._stored(item).name, i) for i, item in enumerate(items)))
        for name, i in named:  # grouped by chunk: one cached chunk at a time, however resharded
            item = items[i]
            if name not in shard.cache:
                shard.cache.clear()
            if item.type == LoadItemType.BYTE_IO:
                deliver_value(planner, item, shard.value(name))
                continue
            expect = self.metadata.state_dict_metadata[item.storage_index.fqn]
            assert isinstance(expect, TensorStorageMetadata)
            sizes = _chunk_sizes(expect, item)
            target = planner.resolve_tensor(item).detach()
            key = shard.direct_key(name, expect, sizes) if _whole(item, sizes) else None
            if key is not None and _fits_directly(target, expect):
                direct.append((key, target))
            else:
                src = shard.chunk(name, expect, sizes)
                for dim, (lo, n) in enumerate(zip(item.storage_offsets, item.lengths)):
                    src = src.narrow(dim, lo, n)
                target.copy_(src)
            done.append((item, target))
        if direct:
            shard.reader.read_many(direct, verify=True)
        for item, target in done:
            planner.commit_tensor(item, target)


def _chunk_sizes(expect: TensorStorageMetadata, item: ReadItem) -> torch.Size:
    index = item.storage_index
    for chunk in expect.chunks:
        if chunk.offsets == index.offset:
            return chunk.sizes
    raise FormatError(f"no chunk of {index.fqn!r} starts at {list(index.offset or [])}")


def _whole(item: ReadItem, sizes: torch.Size) -> bool:
    return all(o == 0 for o in item.storage_offsets) and tuple(item.lengths) == tuple(sizes)


def _fits_directly(target: torch.Tensor, expect: TensorStorageMetadata) -> bool:
    return (
        target.device.type == "cpu"
        and target.dtype == expect.properties.dtype
        and target.is_contiguous()
    )


def deliver_value(planner: LoadPlanner, item: ReadItem, value: Any) -> None:
    """Hand a decoded non-tensor value to the planner without ``load_bytes``'s ``torch.load``.

    torchkeep's planner takes the object (``load_value``); DCP's default planner gets it set at
    the same place its ``load_bytes`` would; any other planner receives bytes pickled here from
    the decoded value (plain types only) and read back by it.
    """
    take = getattr(planner, "load_value", None)
    if take is not None:
        take(item, value)
    elif isinstance(planner, DefaultLoadPlanner):
        if planner.flatten_state_dict:
            set_element(planner.original_state_dict, planner.mappings[item.dest_index.fqn], value)
        else:
            planner.state_dict[item.dest_index.fqn] = value
    else:
        buffer = io.BytesIO()
        torch.save(value, buffer)
        buffer.seek(0)
        planner.load_bytes(item, buffer)
