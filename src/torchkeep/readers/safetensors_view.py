"""Views of torchkeep / safetensors files and Hugging Face sharded folders (header-only opening)."""

from __future__ import annotations

import json
import os
from typing import Any

import torch

from .. import knobs
from ..errors import CheckpointNotFoundError, CorruptionError, FormatError
from ..format import checksum, header
from ..format.dtypes import SAFETENSORS_TO_TORCH
from ..format.tree import TAG
from ..format.tree_decode import decode
from ..storage.paths import inside, plain_name, read_capped
from ..transfer.reader import FileReader, materialize, restore_flags
from .view import CheckpointView, Ref

INDEX_NAME = "model.safetensors.index.json"


class _Pending:
    """Stand-in the tree decoder receives for an ndarray node (``.numpy().astype`` chain)."""

    def __init__(self, ref: Ref) -> None:
        self.ref = ref

    def numpy(self) -> _Pending:
        return self

    def astype(self, *_args: Any, **_kwargs: Any) -> Ref:
        return self.ref


def _entry_ref(reader: FileReader, key: str, name: str) -> Ref:
    info = reader.entry(key)
    dtype = SAFETENSORS_TO_TORCH[info.dtype]
    return Ref(
        name, dtype, info.shape, lambda: reader.read_entry(key), lambda: reader.map_entry(key, True)
    )


class FileView(CheckpointView):
    """A torchkeep file (typed tree, checksums) or a plain safetensors file."""

    def __init__(self, path: str, *, follow_symlinks: bool = True) -> None:
        self.reader = FileReader(path, follow_symlinks=follow_symlinks)
        try:
            fmt = "torchkeep" if self.reader.is_torchkeep else "safetensors"
            if self.reader.metadata.get("torchkeep_kind") == "model":
                fmt = "torchkeep-model"  # torchkeep.save_model: structure and weights
            skeleton = self._skeleton()
            super().__init__(path, fmt, skeleton)
        except BaseException:
            self.reader.close()
            raise
        self.checksum_algorithm = checksum.ALGORITHM if self.reader.is_torchkeep else None
        self.file_metadata = {
            k: v for k, v in self.reader.metadata.items() if not k.startswith("torchkeep.")
        }

    def _skeleton(self) -> Any:
        reader = self.reader
        if not reader.is_torchkeep:
            return {k: _entry_ref(reader, k, k) for k in reader.header.entries}

        def resolve(node: dict, path: str) -> Any:
            info = reader.entry(node["key"])
            meta = torch.empty(info.shape, dtype=SAFETENSORS_TO_TORCH[info.dtype], device="meta")
            shaped = materialize(node, meta, reader.path, path)

            def fetch(node: dict = node, path: str = path) -> torch.Tensor:
                entry = reader.read_entry(node["key"])
                return restore_flags(node, materialize(node, entry, reader.path, path))

            def mapped(node: dict = node, path: str = path) -> torch.Tensor:
                entry = reader.map_entry(node["key"], verify=True)
                return restore_flags(node, materialize(node, entry, reader.path, path))

            ref = Ref(path, shaped.dtype, tuple(shaped.shape), fetch, mapped)
            return _Pending(ref) if node.get(TAG) == "ndarray" else ref

        return decode(reader.tree, resolve, reader.path)

    def check(self, progress: Any = None) -> list[str]:
        """Checksum of every entry (torchkeep) or a full structural read (safetensors).

        Tensors an incremental step takes from an earlier step are verified in that file."""
        problems = []
        names = self.reader.keys()  # this file's entries, then those of earlier steps
        for key in names:
            try:
                if self.reader.checksums:
                    self.reader.verify_entry(key)
                else:
                    self.reader.read_entry(key, verify=False)
            except (CorruptionError, FormatError) as exc:
                problems.append(f"{key}: {exc}")
            if progress is not None:
                progress(self.reader.entry(key).nbytes)
        return problems

    def close(self) -> None:
        self.reader.close()


def _read_index(folder: str) -> dict[str, str]:
    path = os.path.join(folder, INDEX_NAME)
    try:
        where = inside(folder, INDEX_NAME, folder)
        raw = read_capped(where, knobs.MAX_HEADER_BYTES, "not a sharded-model index")
    except FileNotFoundError:
        raise CheckpointNotFoundError(f"{path}: no such file") from None
    obj = header.decode_json(raw, path)
    weight_map = obj.get("weight_map")
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise FormatError(f"{path}: 'weight_map' must map tensor names to shard file names")
    for name, shard in weight_map.items():
        plain_name(shard, f"{path}: tensor {name!r}")
    return weight_map


class ShardedView(CheckpointView):
    """A Hugging Face sharded folder: ``model.safetensors.index.json`` plus its shards."""

    def __init__(self, folder: str) -> None:
        weight_map = _read_index(folder)
        self.readers: dict[str, FileReader] = {}
        try:
            skeleton = {}
            for name, shard in weight_map.items():
                reader = self._reader(folder, shard)
                if name not in reader.header.entries:
                    raise FormatError(
                        f"{reader.path}: the index places tensor {name!r} in this shard but it "
                        "is not there; the folder is incomplete or the index is stale"
                    )
                skeleton[name] = _entry_ref(reader, name, name)
            super().__init__(folder, "hf-sharded", skeleton)
        except BaseException:
            self.close()
            raise

    def _reader(self, folder: str, shard: str) -> FileReader:
        if shard not in self.readers:
            path = os.path.join(folder, shard)
            if not os.path.lexists(path):
                raise CheckpointNotFoundError(
                    f"{path}: shard listed in {INDEX_NAME} is missing; re-download the folder"
                )
            real = inside(folder, shard, f"{folder}/{INDEX_NAME}")  # HF cache links stay inside
            self.readers[shard] = FileReader(real, follow_symlinks=False)
        return self.readers[shard]

    def check(self, progress: Any = None) -> list[str]:
        problems = super().check(progress)
        listed = {n for r in self.readers.values() for n in r.header.entries}
        extra = sorted(listed - set(self.refs))
        if extra:
            problems.append(f"shards hold tensors the index does not list: {', '.join(extra[:8])}")
        return problems

    def close(self) -> None:
        for reader in self.readers.values():
            reader.close()


def dumps_index(weight_map: dict[str, str], total_size: int) -> str:
    """The text of a ``model.safetensors.index.json``."""
    return json.dumps({"metadata": {"total_size": total_size}, "weight_map": weight_map}, indent=2)
