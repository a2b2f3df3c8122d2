"""Single-file training checkpoints: ``save_checkpoint`` / ``load_checkpoint``.

The same capture and restore as :class:`torchkeep.CheckpointManager` (objects in place, plain
values written back, RNG state), for users who manage their own file names.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping
from typing import Any

from .asyncsave import save_blocking
from .format.reader import FileReader
from .state.capture import capture, restore

PathLike = str | os.PathLike


def save_checkpoint(
    path: PathLike,
    state: MutableMapping[str, Any],
    *,
    rng: bool = True,
    metadata: dict[str, str] | None = None,
) -> None:
    """Capture ``state`` (and the RNG state unless ``rng=False``) into one atomic file."""
    save_blocking(capture(state, rng=rng), os.fspath(path), metadata=metadata)


def load_checkpoint(
    path: PathLike,
    state: MutableMapping[str, Any],
    *,
    rng: bool = True,
    verify: bool = True,
) -> MutableMapping[str, Any]:
    """Restore ``path`` into ``state`` in place and return ``state``.

    Stateful objects load through their ``load_state_dict``; plain values are written back into
    the dict; RNG state is restored unless ``rng=False``. A key, shape or object mismatch raises
    :class:`torchkeep.StateDictMismatchError` naming the entry; a corrupt file raises
    :class:`torchkeep.CorruptionError`. Tensors are read to CPU and moved by their targets.
    """
    path = os.fspath(path)
    with FileReader(path) as reader:
        tree = reader.load(map_location="cpu", verify=verify)
    restore(tree, state, rng=rng, source=path)
    return state
