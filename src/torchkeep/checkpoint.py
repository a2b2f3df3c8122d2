"""Single-file training checkpoints: ``save_checkpoint`` / ``load_checkpoint``.

The same capture and restore as :class:`torchkeep.CheckpointManager` (objects in place, plain
values written back, RNG state), for users who manage their own file names.
"""

from __future__ import annotations

import os
from collections.abc import Callable, MutableMapping
from typing import Any, BinaryIO

import torch.distributed as dist
from torch import nn

from .args import check_flag
from .errors import TorchkeepError
from .state.capture import capture, restore
from .state.module import load_from_reader
from .state.report import LoadReport
from .storage.fileobj import is_file_object, readable_copy, writable_path
from .transfer.asyncsave import save_blocking
from .transfer.reader import FileReader

PathLike = str | os.PathLike[str]
#: The metadata file of a sharded checkpoint directory (distributed/metadata.py).
SHARDED_METADATA = "checkpoint.json"


def save_checkpoint(
    path: PathLike | BinaryIO,
    state: MutableMapping[str, Any],
    *,
    rng: bool = True,
    metadata: dict[str, str] | None = None,
    distributed: bool | None = None,
) -> None:
    """Capture ``state`` (and the RNG state unless ``rng=False``) into one atomic file.

    ``path`` may be a writable binary file object (written once the file is complete).
    Inside an initialized process group (``distributed=None`` detects it) every rank must call
    this: ``path`` becomes a sharded checkpoint directory (:func:`torchkeep.distributed.save`).
    ``distributed=False`` saves this process's state alone (e.g. from rank 0 only).
    """
    check_flag(rng, "rng")
    if in_group(distributed):
        _distributed().save(state, _dir_path(path), rng=rng)
        return
    captured = capture(state, rng=rng)
    if is_file_object(path):
        with writable_path(path) as tmp:
            save_blocking(captured, tmp, metadata=metadata)
        return
    save_blocking(captured, os.fspath(path), metadata=metadata)


def load_checkpoint(
    path: PathLike | BinaryIO,
    state: MutableMapping[str, Any],
    *,
    rng: bool = True,
    verify: bool = True,
    follow_symlinks: bool = True,
    storage_options: dict[str, Any] | None = None,
    distributed: bool | None = None,
) -> MutableMapping[str, Any]:
    """Restore ``path`` into ``state`` in place and return ``state``.

    Stateful objects load through their ``load_state_dict``; plain values are written back into
    the dict; RNG state is restored unless ``rng=False``. A key, shape or object mismatch raises
    :class:`torchkeep.StateDictMismatchError` naming the entry; a corrupt file raises
    :class:`torchkeep.CorruptionError`. Tensors are read to CPU and moved by their targets.
    ``follow_symlinks=False`` refuses a link at ``path`` (the manager's steps: a run directory
    may have been prepared by someone else). ``path`` may be a seekable binary file object.
    A sharded checkpoint directory is loaded by every rank of the process group, resharded
    (:func:`torchkeep.distributed.load`; ``distributed=False`` refuses it).
    """
    check_flag(rng, "rng")
    check_flag(verify, "verify")
    if not is_file_object(path) and _is_sharded(path) and in_group(distributed, path):
        _distributed().load(state, os.fspath(path), rng=rng)
        return state
    if is_file_object(path):
        with readable_copy(path) as tmp:
            return load_checkpoint(tmp, state, rng=rng, verify=verify)
    path = os.fspath(path)
    with FileReader(path, storage_options, follow_symlinks=follow_symlinks) as reader:
        # Module weights are mapped placeholders here: verified and shape-checked before
        # anything changes (a corrupt file leaves every object untouched), then read straight
        # into the parameters, so no second copy of the weights is ever held.
        tree = reader.load(map_location="cpu", verify=verify, placeholders=_module_paths(state))

        def load_module(name: str, module: nn.Module) -> LoadReport:
            return load_from_reader(module, reader, ("objects", name), strict=True, verify=False)

        restore(tree, state, rng=rng, source=path, load_module=load_module)
    return state


def _module_paths(state: MutableMapping[str, Any]) -> Callable[[str], bool]:
    """Whether a tree path lies in a module's saved state dict (``objects.<name>.``...).

    A path belongs to the longest object name it starts with, so an object named ``model.ema``
    is not mistaken for part of a module named ``model``.
    """
    names = sorted((str(n) for n in state), key=len, reverse=True)
    modules = {name for name, value in state.items() if isinstance(value, nn.Module)}

    def inside_module(path: str) -> bool:
        for name in names:
            if path.startswith(f"objects.{name}."):
                return name in modules
        return False

    return inside_module


def in_group(distributed: bool | None, sharded_path: PathLike | None = None) -> bool:
    """Whether to take the sharded path: asked for, or (None) a process group is initialized."""
    if distributed is not None:
        check_flag(distributed, "distributed")
    active = dist.is_available() and dist.is_initialized()
    if distributed is None:
        return active or sharded_path is not None
    if distributed and not active and sharded_path is None:
        raise TorchkeepError(
            "distributed=True but no torch.distributed process group is initialized; "
            "call dist.init_process_group first"
        )
    return distributed


def _is_sharded(path: PathLike | BinaryIO) -> bool:
    """A local directory holding a sharded checkpoint's ``checkpoint.json``."""
    path = os.fspath(path)  # type: ignore[arg-type]
    return "://" not in path and os.path.isfile(os.path.join(path, SHARDED_METADATA))


def _dir_path(path: PathLike | BinaryIO) -> str:
    if is_file_object(path):
        raise TorchkeepError(
            "save_checkpoint inside a process group writes a directory (one file per rank); "
            "pass a path, or distributed=False to save this process's state alone"
        )
    return os.fspath(path)


def _distributed() -> Any:
    """``torchkeep.distributed``, imported on first use: torch.distributed.checkpoint adds
    about a second to ``import torchkeep`` and only process groups need it."""
    import torchkeep.distributed as tkd

    return tkd
