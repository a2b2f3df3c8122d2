"""Open one checkpoint file (torchkeep, safetensors, ``torch.save``) as a :class:`CheckpointView`.

Folder formats build on this (a run directory's step folder opens each of its files here), so
it sits below :mod:`torchkeep.readers.open`, which dispatches files and folders alike.
"""

from __future__ import annotations

import os

from ..errors import FormatError
from ..storage.paths import open_regular
from . import detect
from .safetensors_view import FileView
from .torch_view import TorchFileView
from .view import CheckpointView


def open_file_view(
    path: str | os.PathLike, trusted: bool = False, *, follow_symlinks: bool = True
) -> CheckpointView:
    """A view of the checkpoint file at ``path``; pickles only run if ``trusted``.

    ``follow_symlinks=False`` for a file found in a directory: a link, FIFO or device there is
    refused with :class:`UnsafePathError` before anything is read.
    """
    path = os.fspath(path)
    if not follow_symlinks:
        os.close(open_regular(path))  # refuses links and special files (no blocking on a FIFO)
    kind = detect.sniff(path)
    if kind == detect.SAFETENSORS:
        return FileView(path, follow_symlinks=follow_symlinks)
    if kind in (detect.TORCH_ZIP, detect.TORCH_LEGACY):
        return TorchFileView(path, kind, trusted)
    raise FormatError(f"{path}: format {kind!r} is a folder format, not a checkpoint file")
