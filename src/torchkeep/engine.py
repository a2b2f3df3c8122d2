"""The one save path (prepare -> write -> commit) and the format-dispatching load."""

from __future__ import annotations

import os
from typing import Any

from .readers import detect
from .readers.open import load_folder
from .readers.torch_file import load_torch_file
from .storage.run_dir import STATE_FILE, join, list_steps
from .storage.urls import backend_for, is_url
from .transfer.asyncsave import save_blocking
from .transfer.reader import FileReader, MapLocation

PathLike = str | os.PathLike


def save(
    obj: Any,
    path: PathLike,
    *,
    metadata: dict[str, str] | None = None,
    storage_options: dict | None = None,
) -> None:
    """Save ``obj`` (state_dict, optimizer state, checkpoint dict...) to ``path`` atomically.

    The object is validated first (an unsupported value raises before any byte is written), then
    written to a temporary file, fsynced and renamed over ``path``: a crash leaves either the old
    or the new file. The result opens with the stock ``safetensors`` library. This is
    :func:`save_async` run inline and waited for (one save path), minus the snapshot copy.
    ``path`` may be an fsspec URL (``s3://bucket/x.tk``; docs/remote.md).
    """
    save_blocking(obj, os.fspath(path), metadata=metadata, storage_options=storage_options)


def load(
    path: PathLike,
    *,
    map_location: MapLocation = None,
    mmap: bool = False,
    verify: bool = True,
    trusted: bool = False,
    storage_options: dict | None = None,
) -> Any:
    """Load what :func:`save` wrote, or a safetensors / ``torch.save`` file, without running code.

    ``verify`` checks every tensor's checksum (torchkeep files). ``mmap`` maps tensors from the
    file instead of reading them. ``torch.save`` files go through the weights-only unpickler;
    ``trusted=True`` is the only way to unpickle anything else.
    """
    path = os.fspath(path)
    if is_url(path):
        return _load_url(path, map_location, verify, storage_options)
    kind = detect.sniff(path)
    if os.path.isdir(path):  # HF shards, DCP, Accelerate, run directory (readers/open.py)
        return load_folder(path, map_location=map_location, trusted=trusted)
    if kind == detect.SAFETENSORS:
        with FileReader(path) as reader:
            return reader.load(map_location=map_location, mmap=mmap, verify=verify)
    return load_torch_file(path, map_location=map_location, mmap=mmap, trusted=trusted)


def _load_url(
    path: str, map_location: MapLocation, verify: bool, storage_options: dict | None
) -> Any:
    """A torchkeep/safetensors object, or the newest committed step of a run directory."""
    backend = backend_for(path, storage_options)
    if backend.kind(path) == "dir":
        steps = list_steps(path, backend)
        # the newest step, or a step prefix itself (FileReader says when it holds nothing)
        path = join(steps[-1].path if steps else path, STATE_FILE)
    with FileReader(path, storage_options) as reader:
        return reader.load(map_location=map_location, verify=verify)


def open_file(path: PathLike, *, storage_options: dict | None = None) -> FileReader:
    """Open a torchkeep/safetensors file lazily (header only); read tensors by key on demand."""
    return FileReader(path, storage_options)


def verify(path: PathLike, *, storage_options: dict | None = None) -> list[str]:
    """Keys of the corrupt tensors of a torchkeep file (empty when every checksum matches)."""
    with FileReader(path, storage_options) as reader:
        return reader.corrupt_entries()
