"""Views of ``torch.save`` files (zip and legacy) and Lightning ``.ckpt`` files.

Loading goes through :func:`load_torch_file` (weights-only unless trusted). Zip files are
memory-mapped, so tensors are paged in from the file as they are read, not all held at once.
"""

from __future__ import annotations

from typing import Any

import torch

from . import detect
from .torch_file import load_torch_file
from .view import CheckpointView, skeleton_of

LIGHTNING_KEY = "pytorch-lightning_version"


def torch_format(obj: Any, kind: str) -> str:
    """``lightning`` for a Lightning checkpoint, else the torch.save flavour."""
    if isinstance(obj, dict) and LIGHTNING_KEY in obj:
        return "lightning"
    if isinstance(obj, torch.nn.Module):
        return f"{kind} (whole model)"
    return kind


class TorchFileView(CheckpointView):
    """A ``torch.save`` file; the loaded object is kept so conversions can re-save it."""

    def __init__(self, path: str, kind: str, trusted: bool = False) -> None:
        obj = load_torch_file(
            path, map_location="cpu", mmap=kind == detect.TORCH_ZIP, trusted=trusted
        )
        self.obj = obj
        shown = obj.state_dict() if isinstance(obj, torch.nn.Module) else obj
        super().__init__(path, torch_format(obj, kind), skeleton_of(shown, where=path))
