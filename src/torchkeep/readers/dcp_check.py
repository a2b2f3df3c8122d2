"""Validate a DCP checkpoint's metadata before any of its numbers or paths is used.

The ``.metadata`` pickle names tensor sizes, chunk offsets, storage files, byte offsets and
lengths. Each is checked here (types, ranges, ranks, paths that stay inside the folder and
name regular files, byte ranges inside those files) and the tensors' total size is held to the
expansion limit of the files' real size (``format/bounds.py``), so a small folder cannot make
a reader allocate or loop over gigabytes. Every failure is a :class:`FormatError` naming the
folder and the item.
"""

from __future__ import annotations

import os
import re
import stat
from typing import Any

import torch

from .. import knobs
from ..errors import FormatError
from ..format import bounds
from ..format.dtypes import dtype_name, override_dtype

_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)


#: Per-rank metadata files of ``dcp.save(..., use_collectives=False)`` (no global .metadata).
RANK_METADATA = re.compile(r"^__([0-9]{1,7})\.metadata$")


def read_regular(path: str, cap: int, what: str) -> bytes:
    """The bytes of ``path``, refused unless it is a regular file (no symlink) of at most
    ``cap`` bytes."""
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except OSError as exc:
        raise FormatError(f"{path}: cannot open the {what} ({exc.strerror}); it must be a "
                          "regular file, not a symlink") from exc  # fmt: skip
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise FormatError(f"{path}: the {what} is not a regular file")
        if info.st_size > cap:
            raise FormatError(f"{path}: the {what} is {info.st_size} bytes, over the {cap} cap")
        chunks, done = [], 0
        while done < info.st_size:
            piece = os.pread(fd, info.st_size - done, done)
            if not piece:
                break
            chunks.append(piece)
            done += len(piece)
        return b"".join(chunks)
    finally:
        os.close(fd)


def read_range(path: str, offset: int, length: int) -> bytes:
    """``length`` bytes at ``offset`` of the regular file ``path`` (no symlink), range checked
    against the file's size before anything is allocated."""
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except OSError as exc:
        raise FormatError(f"{path}: cannot open DCP storage file ({exc.strerror})") from exc
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or offset + length > info.st_size:
            raise FormatError(
                f"{path}: DCP item at {offset}+{length} is outside the {info.st_size}-byte file"
            )
        data = os.pread(fd, length, offset)
        if len(data) != length:
            raise FormatError(f"{path}: DCP storage file shrank while it was read")
        return data
    finally:
        os.close(fd)


def check_metadata(meta: Any, folder: str, metadata_bytes: int) -> None:
    """Validate ``meta`` (types, numbers, paths) and hold its tensors to the expansion limit."""
    where = f"{folder}: DCP metadata"
    items = getattr(meta, "state_dict_metadata", None)
    storage = getattr(meta, "storage_data", None)
    if not isinstance(items, dict) or not isinstance(storage, dict):
        raise FormatError(f"{where}: state_dict_metadata and storage_data must be dicts")
    claimed = 0
    for fqn, item in items.items():
        if not isinstance(fqn, str):
            raise FormatError(f"{where}: key {fqn!r} is not a string")
        if hasattr(item, "chunks"):
            claimed += _check_tensor(fqn, item, where)
    files = _check_storage(storage, folder, where)
    _check_planner(getattr(meta, "planner_data", None), where)
    bounds.check_expansion(claimed, metadata_bytes + sum(files.values()), folder)


def _dims(value: Any, rank: int | None, what: str) -> tuple[int, ...]:
    dims = tuple(value) if isinstance(value, (list, tuple)) else None
    if dims is None or bounds.dims_numel(dims) is None or (rank is not None and len(dims) != rank):
        rank_text = f" of rank {rank}" if rank is not None else ""
        raise FormatError(f"{what} must be a shape{rank_text} of ints in [0, 2**63)")
    return dims


def _check_tensor(fqn: str, item: Any, where: str) -> int:
    """Size, dtype and chunks of one tensor; returns its logical bytes."""
    at = f"{where}: tensor {fqn!r}"
    size = _dims(getattr(item, "size", None), None, f"{at}: size")
    dtype = getattr(getattr(item, "properties", None), "dtype", None)
    try:
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"{dtype!r} is not a dtype")
        override_dtype(dtype_name(dtype))  # never quantized or bits*
    except ValueError as exc:
        raise FormatError(f"{at}: {exc}") from exc
    chunks = getattr(item, "chunks", None)
    if not isinstance(chunks, list):
        raise FormatError(f"{at}: chunks must be a list")
    for chunk in chunks:
        offsets = _dims(getattr(chunk, "offsets", None), len(size), f"{at}: chunk offsets")
        sizes = _dims(getattr(chunk, "sizes", None), len(size), f"{at}: chunk sizes")
        if any(o + n > d for o, n, d in zip(offsets, sizes, size)):
            raise FormatError(f"{at}: chunk at {list(offsets)} of {list(sizes)} is out of bounds")
    return bounds.dims_numel(size) * dtype.itemsize  # type: ignore[operator]


def _check_storage(storage: dict, folder: str, where: str) -> dict[str, int]:
    """Every storage location; returns the size of each storage file it names."""
    sizes: dict[str, int] = {}
    for index, info in storage.items():
        fqn = getattr(index, "fqn", None)
        if not isinstance(fqn, str):
            raise FormatError(f"{where}: a storage key has no string fqn")
        offset = getattr(index, "offset", None)
        if offset is not None:
            _dims(offset, None, f"{where}: storage offset of {fqn!r}")
        rel = getattr(info, "relative_path", None)
        start, length = getattr(info, "offset", None), getattr(info, "length", None)
        rel = check_relative(rel, folder)
        if type(start) is not int or type(length) is not int or start < 0 or length < 0:
            raise FormatError(f"{where}: {fqn!r} has a bad byte range {start!r}+{length!r}")
        if rel not in sizes:
            sizes[rel] = _file_size(os.path.join(folder, rel))
        if start + length > sizes[rel]:
            raise FormatError(
                f"{folder}/{rel}: DCP item {fqn!r} at {start}+{length} is outside the "
                f"{sizes[rel]}-byte file"
            )
    return sizes


def check_relative(rel: Any, folder: str) -> str:
    """``rel``, checked to be a plain file name inside the folder."""
    if (
        not isinstance(rel, str)
        or rel in ("", ".", "..")
        or os.path.basename(rel) != rel
        or "\0" in rel
        or len(rel) > 255
    ):
        raise FormatError(f"{folder}: DCP storage path {rel!r} leaves the directory")
    return rel


def _file_size(path: str) -> int:
    try:
        info = os.lstat(path)
    except OSError as exc:
        raise FormatError(f"{path}: DCP storage file is missing ({exc.strerror})") from exc
    if not stat.S_ISREG(info.st_mode):
        raise FormatError(f"{path}: DCP storage file is not a regular file (symlink or folder)")
    return info.st_size


def _check_planner(planner: Any, where: str) -> None:
    """``planner_data`` paths rebuild the nesting; each must be a short tuple of names."""
    if planner is None:
        return
    if not isinstance(planner, dict):
        raise FormatError(f"{where}: planner_data must be a dict")
    for fqn, path in planner.items():
        if not isinstance(path, (tuple, list)) or len(path) > knobs.MAX_TREE_DEPTH:
            raise FormatError(f"{where}: planner_data path of {fqn!r} is malformed")
        if not all(type(part) in (str, int) for part in path):
            raise FormatError(f"{where}: planner_data path of {fqn!r} holds a non-name")
