"""The one save path (prepare -> write -> commit) and the format-dispatching load."""

from __future__ import annotations

import os
from typing import Any, BinaryIO

from .args import MapLocation, check_flag, check_map_location, resolve_callable
from .format.tree_decode import iter_tensor_nodes
from .readers import detect
from .readers.open import load_folder
from .readers.torch_file import load_torch_file
from .storage.fileobj import is_file_object, readable_copy, writable_path
from .storage.run_dir import STATE_FILE, join, list_steps
from .storage.urls import is_url, remote_backend_for
from .transfer.asyncsave import save_blocking
from .transfer.reader import FileReader

PathLike = str | os.PathLike[str]
"""A file-system path: ``str`` or ``pathlib.Path``."""
Target = PathLike | BinaryIO
"""A path, or a binary file object (``io.BytesIO``, ``open(p, "rb")``/``"wb"``)."""


def save(
    obj: Any,
    path: Target,
    *,
    metadata: dict[str, str] | None = None,
    storage_options: dict[str, Any] | None = None,
) -> None:
    """Save ``obj`` (state_dict, optimizer state, checkpoint dict...) to ``path`` atomically.

    The object is validated first (an unsupported value raises before any byte is written), then
    written to a temporary file, fsynced and renamed over ``path``: a crash leaves either the old
    or the new file. The result opens with the stock ``safetensors`` library. This is
    :func:`save_async` run inline and waited for (one save path), minus the snapshot copy.
    ``path`` may also be a binary file object (``io.BytesIO``, ``open(p, "wb")``): the file is
    written to a private temporary file first, then copied into it; or an fsspec URL
    (``s3://bucket/x.tk``; docs/remote.md).
    """
    if is_file_object(path):
        with writable_path(path) as tmp:
            save_blocking(obj, tmp, metadata=metadata)
        return
    save_blocking(obj, os.fspath(path), metadata=metadata, storage_options=storage_options)


def load(
    path: Target,
    *,
    map_location: MapLocation = None,
    mmap: bool = False,
    verify: bool = True,
    trusted: bool = False,
    storage_options: dict[str, Any] | None = None,
) -> Any:
    """Load what :func:`save` wrote, or a safetensors / ``torch.save`` file, without running code.

    ``verify`` checks every tensor's checksum (torchkeep files). ``mmap`` maps tensors from the
    file instead of reading them. ``torch.save`` files go through the weights-only unpickler;
    ``trusted=True`` is the only way to unpickle anything else. ``map_location`` is what
    ``torch.load`` takes (device, dict, or callable). ``path`` may be a seekable binary file
    object (read from its current position).
    """
    check_map_location(map_location)
    for name, flag in (("mmap", mmap), ("verify", verify), ("trusted", trusted)):
        check_flag(flag, name)
    if is_file_object(path):
        if mmap:
            raise ValueError("mmap=True needs a path: a file object cannot be memory-mapped")
        with readable_copy(path) as tmp:
            return load(tmp, map_location=map_location, verify=verify, trusted=trusted)
    path = os.fspath(path)
    if is_url(path):
        return _load_url(path, map_location, verify, storage_options)
    kind = detect.sniff(path)
    if os.path.isdir(path):  # HF shards, DCP, Accelerate, run directory (readers/open.py)
        if callable(map_location):
            map_location = resolve_callable(map_location, ["cpu"])["cpu"]
        return load_folder(path, map_location=map_location, trusted=trusted)
    if kind == detect.SAFETENSORS:
        with FileReader(path) as reader:
            if callable(map_location):
                saved = [n.get("device", "cpu") for _, n in iter_tensor_nodes(reader.tree)]
                map_location = resolve_callable(map_location, map(str, saved or ["cpu"]))
            return reader.load(map_location=map_location, mmap=mmap, verify=verify)
    return load_torch_file(path, map_location=map_location, mmap=mmap, trusted=trusted)


def _load_url(
    path: str, map_location: MapLocation, verify: bool, storage_options: dict[str, Any] | None
) -> Any:
    """A torchkeep/safetensors object, or the newest committed step of a run directory."""
    backend = remote_backend_for(path, storage_options)
    if backend.kind(path) == "dir":
        steps = list_steps(path, backend)
        # the newest step, or a step prefix itself (FileReader says when it holds nothing)
        path = join(steps[-1].path if steps else path, STATE_FILE)
    with FileReader(path, storage_options) as reader:
        return reader.load(map_location=map_location, verify=verify)


def open_file(path: PathLike, *, storage_options: dict[str, Any] | None = None) -> FileReader:
    """Open a torchkeep/safetensors file lazily (header only); read tensors by key on demand."""
    if is_file_object(path):
        raise TypeError(
            "open_file needs a path (it reads tensors from the file on demand); "
            "use torchkeep.load(file_object) to read a file object whole"
        )
    return FileReader(path, storage_options)


def verify(path: Target, *, storage_options: dict[str, Any] | None = None) -> list[str]:
    """Keys of the corrupt tensors of a torchkeep file (empty when every checksum matches).

    ``path`` may be a seekable binary file object or an fsspec URL.
    """
    if is_file_object(path):
        with readable_copy(path) as tmp:
            return verify(tmp)
    with FileReader(path, storage_options) as reader:
        return reader.corrupt_entries()
