"""Streaming writer: torchkeep / safetensors files written one tensor at a time.

Conversions read tensors lazily from a source checkpoint; holding them all would cost the whole
checkpoint in memory. Entry sizes are known from dtype and shape before any tensor is read, so
the header (with fixed-width checksum placeholders) is laid out first, each tensor is fetched,
converted, written and hashed, then dropped; the final header is written over the placeholder.
Peak memory is about the largest tensor.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import UnsupportedValueError
from ..format import checksum, header
from ..format.dtypes import TORCH_TO_SAFETENSORS, dtype_name, storage_dtype
from ..format.memory import byte_view
from ..format.tree import encode
from ..storage.backend import LocalFilePayload
from ..storage.io import ops, write_all
from ..storage.local import atomic_file
from ..storage.urls import backend_for, is_url


@contextlib.contextmanager
def destination(path: str, size: int) -> Iterator[int]:
    """An atomic local file, or for a URL a local temporary file uploaded whole at the end.

    A conversion fetches tensors one by one and patches its header last, so for an object
    store it is assembled locally first (a local temporary of the output's size) and then
    uploaded with the store's atomic upload; the temporary is removed either way.
    """
    if not is_url(path):
        with atomic_file(path, size) as fd:
            yield fd
        return
    handle, temp = tempfile.mkstemp(prefix="torchkeep-convert-", suffix=".tmp")
    try:
        yield handle
        os.fsync(handle)
        backend_for(path).write_payload(path, LocalFilePayload(temp))
    finally:
        os.close(handle)
        os.unlink(temp)


@dataclass
class StreamEntry:
    """One entry to write: its key, stored dtype/shape, and how to produce its tensor."""

    key: str
    dtype: torch.dtype
    shape: list[int]
    fetch: Callable[[], torch.Tensor]
    st_dtype: str = ""
    begin: int = 0
    end: int = 0

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()


def layout(entries: list[StreamEntry], plain: bool) -> None:
    """Assign stored dtypes and byte ranges (largest element size first, for alignment)."""
    for entry in entries:
        if plain and entry.dtype not in TORCH_TO_SAFETENSORS:
            raise UnsupportedValueError(
                f"tensor {entry.key!r}: dtype {dtype_name(entry.dtype)} has no safetensors "
                "name; convert to a torchkeep file (.tk) or pass --dtype"
            )
        entry.st_dtype = storage_dtype(entry.dtype, entry.key)
    entries.sort(key=lambda e: -e.itemsize)
    offset = 0
    for entry in entries:
        numel = 1
        for d in entry.shape:
            numel *= d
        entry.begin, entry.end = offset, offset + numel * entry.itemsize
        offset = entry.end


def _header_entries(entries: list[StreamEntry]) -> dict[str, dict]:
    out = {}
    for e in entries:
        shape = e.shape if e.st_dtype != "U8" or e.dtype == torch.uint8 else [e.end - e.begin]
        out[e.key] = {"dtype": e.st_dtype, "shape": shape, "data_offsets": [e.begin, e.end]}
    return out


def _torchkeep_header(
    entries: list[StreamEntry], tree: Any, user: dict[str, str], sums: dict[str, str] | None
) -> bytes:
    final = sums is not None
    if sums is None:
        sums = {e.key: checksum.PLACEHOLDER for e in entries}
    tree_text = json.dumps(tree, separators=(",", ":"), allow_nan=False)
    meta = header.torchkeep_metadata(tree_text, sums, user)
    encoded = header.encode_header(_header_entries(entries), meta)
    return header.seal(encoded) if final else encoded


def _write_data(
    fd: int, entries: list[StreamEntry], start: int, progress: Callable[[int], None] | None
) -> dict[str, str]:
    sums = {}
    file_ops = ops()
    for entry in entries:
        tensor = entry.fetch().detach().to("cpu")
        if tensor.dtype != entry.dtype:
            tensor = tensor.to(entry.dtype)
        if list(tensor.shape) != entry.shape:
            raise UnsupportedValueError(
                f"tensor {entry.key!r}: source gave shape {list(tensor.shape)}, "
                f"expected {entry.shape}"
            )
        view = byte_view(tensor.contiguous())
        sums[entry.key] = checksum.digest(view)
        write_all(file_ops, fd, view, start + entry.begin)
        if progress is not None:
            progress(view.nbytes)
        del tensor, view
    return sums


def write_safetensors(
    path: str | os.PathLike,
    entries: list[StreamEntry],
    metadata: dict[str, str] | None = None,
    progress: Callable[[int], None] | None = None,
) -> None:
    """A plain safetensors file (flat tensors, no checksums), written atomically."""
    layout(entries, plain=True)
    head = header.encode_header(_header_entries(entries), {"format": "pt", **(metadata or {})})
    size = len(head) + (entries[-1].end if entries else 0)
    with destination(os.fspath(path), size) as fd:
        write_all(ops(), fd, memoryview(head), 0)
        _write_data(fd, entries, len(head), progress)


def _in_memory(tensor: torch.Tensor) -> StreamEntry:
    """An entry for a tensor the skeleton holds itself (a NumPy array, e.g. an RNG state)."""
    return StreamEntry("", tensor.dtype, list(tensor.shape), lambda: tensor)


def write_torchkeep(
    path: str | os.PathLike,
    skeleton: Any,
    entries: dict[int, StreamEntry],
    metadata: dict[str, str] | None = None,
    progress: Callable[[int], None] | None = None,
) -> None:
    """A torchkeep file whose typed tree is ``skeleton`` (tensors given as placeholders).

    ``skeleton`` holds zero-size placeholder tensors; ``entries`` maps ``id(placeholder)`` to
    the entry that supplies the real tensor.
    """
    tree, leaves = encode(skeleton)
    planned = []
    for leaf in leaves:
        entry = entries.get(id(leaf.tensor)) or _in_memory(leaf.tensor)
        entry.key = leaf.key
        leaf.node["key"] = leaf.key
        planned.append((leaf.node, entry))
    ordered = [entry for _, entry in planned]
    layout(ordered, plain=False)
    for node, entry in planned:
        if entry.st_dtype == "U8" and entry.dtype != torch.uint8:
            node["dtype"], node["shape"] = dtype_name(entry.dtype), list(entry.shape)
    user = dict(metadata or {})
    placeholder = _torchkeep_header(ordered, tree, user, None)
    size = len(placeholder) + (ordered[-1].end if ordered else 0)
    with destination(os.fspath(path), size) as fd:
        write_all(ops(), fd, memoryview(placeholder), 0)
        sums = _write_data(fd, ordered, len(placeholder), progress)
        final = _torchkeep_header(ordered, tree, user, sums)
        if len(final) != len(placeholder):
            raise AssertionError("torchkeep header changed length between placeholder and final")
        write_all(ops(), fd, memoryview(final), 0)
