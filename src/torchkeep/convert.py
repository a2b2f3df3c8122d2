"""Convert any readable checkpoint to torchkeep, safetensors (file or HF-sharded folder) or
``torch.save``, streaming tensors one at a time where the destination format allows it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable

import torch

from .errors import TorchkeepError
from .readers.safetensors_view import INDEX_NAME, dumps_index
from .readers.view import CheckpointView, Ref, map_refs
from .storage.io import ops, write_all
from .storage.local import atomic_file, commit_dir, make_temp_dir
from .transfer.stream import StreamEntry, layout, write_safetensors, write_torchkeep

TORCHKEEP, SAFETENSORS, TORCH = "torchkeep", "safetensors", "torch"
_TORCH_EXT = (".pt", ".pth", ".bin", ".ckpt")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}

Progress = Callable[[int], None] | None


def parse_size(text: str) -> int:
    """``"5GB"`` -> 5_000_000_000; ``"500MiB"`` -> 524_288_000; plain integers are bytes."""
    match = _SIZE.match(text)
    if not match:
        raise TorchkeepError(f"shard size {text!r} is not a size like 5GB, 500MB or 1000000")
    number, unit = float(match.group(1)), match.group(2).upper()
    base = 1024 if "I" in unit else 1000
    power = "BKMGT".index(unit[0]) if unit and unit[0] in "KMGT" else 0
    size = int(number * (base**power if power else _UNITS[""]))
    if size <= 0:
        raise TorchkeepError(f"shard size {text!r} must be positive")
    return size


def destination_format(dst: str, max_shard_size: int | None) -> str:
    """Format written to ``dst``, chosen by its extension (and ``--max-shard-size``)."""
    if max_shard_size is not None:
        return SAFETENSORS
    lower = dst.lower()
    if lower.endswith(".safetensors"):
        return SAFETENSORS
    if lower.endswith(_TORCH_EXT):
        return TORCH
    return TORCHKEEP


def _cast(dtype: torch.dtype, target: torch.dtype | None) -> torch.dtype:
    return target if target is not None and dtype.is_floating_point else dtype


def _entry(ref: Ref, key: str, target: torch.dtype | None) -> StreamEntry:
    return StreamEntry(key, _cast(ref.dtype, target), list(ref.shape), ref.fetch)


def convert_view(
    view: CheckpointView,
    dst: str,
    *,
    fmt: str | None = None,
    dtype: torch.dtype | None = None,
    max_shard_size: int | None = None,
    progress: Progress = None,
) -> str:
    """Write ``view`` to ``dst``; returns the format written."""
    fmt = fmt or destination_format(dst, max_shard_size)
    if fmt == TORCHKEEP and max_shard_size is None:
        _to_torchkeep(view, dst, dtype, progress)
    elif fmt == SAFETENSORS and max_shard_size is not None:
        _to_sharded(view, dst, dtype, max_shard_size, progress)
    elif fmt == SAFETENSORS:
        entries = [_entry(ref, name, dtype) for name, ref in view.refs.items()]
        write_safetensors(dst, entries, progress=progress)
    elif fmt == TORCH and max_shard_size is None:
        _to_torch(view, dst, dtype, progress)
    else:
        raise TorchkeepError(f"--max-shard-size writes safetensors shards, not {fmt}")
    return fmt


def _to_torchkeep(view: CheckpointView, dst: str, dtype: torch.dtype | None, progress: Progress):
    entries: dict[int, StreamEntry] = {}

    def placeholder(ref: Ref) -> torch.Tensor:
        stand_in = torch.empty(0)
        entries[id(stand_in)] = _entry(ref, ref.name, dtype)
        return stand_in

    skeleton = map_refs(view.skeleton, placeholder)
    write_torchkeep(dst, skeleton, entries, None, progress)


def _to_torch(view: CheckpointView, dst: str, dtype: torch.dtype | None, progress: Progress):
    """torch.save needs the whole object at once; tensors stay memory-mapped where possible."""

    keep: list[torch.Tensor] = []  # mapped sources stay alive while their slices are saved
    seen: dict[int, torch.dtype] = {}

    def read(ref: Ref) -> torch.Tensor:
        tensor = (ref.mapped or ref.fetch)()
        target = _cast(tensor.dtype, dtype)
        if progress is not None:
            progress(ref.nbytes)
        if target != tensor.dtype:
            return tensor.to(target)
        keep.append(tensor)
        return own_storage(tensor, seen)

    obj = map_refs(view.skeleton, read)
    with atomic_file(os.path.abspath(dst)) as fd, os.fdopen(os.dup(fd), "wb") as handle:
        torch.save(obj, handle)


def own_storage(tensor: torch.Tensor, seen: dict[int, torch.dtype]) -> torch.Tensor:
    """``tensor`` on a storage of its own bytes, so ``torch.save`` can write it.

    Tensors mapped from one file share that file's storage under different dtypes, which
    ``torch.save`` refuses (and it would write the whole file once per storage). A slice of the
    untyped storage covers exactly the tensor's bytes without copying; ``seen`` (data pointer
    -> dtype) catches what a slice cannot separate, which is copied instead.
    """
    if tensor.numel() == 0:
        return _flags_like(tensor, torch.empty(tensor.shape, dtype=tensor.dtype))
    storage = tensor.untyped_storage()
    size = tensor.element_size()
    span = 1 + sum((n - 1) * s for n, s in zip(tensor.shape, tensor.stride()))
    begin = tensor.storage_offset() * size
    if begin != 0 or span * size != storage.nbytes():
        piece = storage[begin : begin + span * size]
        owned = torch.empty(0, dtype=tensor.dtype).set_(piece, 0, tensor.shape, tensor.stride())
        tensor = _flags_like(tensor, owned)
    if seen.setdefault(tensor.data_ptr(), tensor.dtype) != tensor.dtype:
        tensor = _flags_like(tensor, tensor.detach().clone())
    return tensor


def _flags_like(source: torch.Tensor, tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` as a Parameter / requiring grad when ``source`` was."""
    if isinstance(source, torch.nn.Parameter):
        return torch.nn.Parameter(tensor, requires_grad=source.requires_grad)
    return tensor.requires_grad_(True) if source.requires_grad else tensor


def shard_plan(entries: list[StreamEntry], max_bytes: int) -> list[list[StreamEntry]]:
    """Greedy split in order: a shard closes before it would exceed ``max_bytes``."""
    shards: list[list[StreamEntry]] = [[]]
    used = 0
    for entry in entries:
        size = entry.end - entry.begin
        if shards[-1] and used + size > max_bytes:
            shards.append([])
            used = 0
        shards[-1].append(entry)
        used += size
    return shards


def _to_sharded(
    view: CheckpointView, dst: str, dtype: torch.dtype | None, max_bytes: int, progress: Progress
) -> None:
    if os.path.lexists(dst):
        raise TorchkeepError(f"{dst}: already exists; choose a new folder for the shards")
    entries = [_entry(ref, name, dtype) for name, ref in view.refs.items()]
    layout(list(entries), plain=True)  # sizes and dtype checks before anything is written
    shards = shard_plan(entries, max_bytes)
    tmp = make_temp_dir(os.path.abspath(dst))
    weight_map: dict[str, str] = {}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(os.path.join(tmp, name), shard, progress=progress)
        weight_map.update({e.key: name for e in shard})
    total = sum(e.end - e.begin for e in entries)
    text = dumps_index(weight_map, total).encode()
    with atomic_file(os.path.join(tmp, INDEX_NAME), len(text)) as fd:
        write_all(ops(), fd, memoryview(text), 0)
    commit_dir(tmp, os.path.abspath(dst))
