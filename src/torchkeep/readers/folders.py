"""Views of folder checkpoints made of several files: Accelerate ``save_state`` folders.

Each file becomes a top-level entry named after its stem (``model``, ``optimizer``,
``random_states_0``). Files that the weights-only unpickler refuses are skipped with a note
(they hold e.g. NumPy RNG state) unless the caller trusts the folder.
"""

from __future__ import annotations

import os
from typing import Any

from ..errors import UnsafeFileError
from . import detect
from .safetensors_view import FileView
from .torch_file import load_torch_file
from .view import CheckpointView, skeleton_of

_MODEL = detect.ACCELERATE_MODEL
_STATE = detect.ACCELERATE_STATE


class AccelerateView(CheckpointView):
    """An Accelerate ``save_state`` folder; model weights stay lazy, state files are loaded."""

    def __init__(self, folder: str, trusted: bool = False) -> None:
        self.files: list[FileView] = []
        skeleton: dict[str, Any] = {}
        notes: list[str] = []
        try:
            for name in sorted(os.listdir(folder)):
                if not (_MODEL.match(name) or _STATE.match(name)):
                    continue
                stem = name.rsplit(".", 1)[0]
                try:
                    skeleton[stem] = self._load(os.path.join(folder, name), trusted)
                except UnsafeFileError as exc:
                    bad = ", ".join(exc.globals[:4])
                    notes.append(f"{name}: skipped, needs --trusted (pickle imports {bad})")
            super().__init__(folder, "accelerate", skeleton, notes)
        except BaseException:
            self.close()
            raise

    def _load(self, path: str, trusted: bool) -> Any:
        kind = detect.sniff_file(path)
        if kind == detect.SAFETENSORS:
            view = FileView(path)
            self.files.append(view)
            return view.skeleton
        obj = load_torch_file(path, map_location="cpu", trusted=trusted)
        return skeleton_of(obj, os.path.basename(path).rsplit(".", 1)[0])

    def check(self, progress: Any = None) -> list[str]:
        problems = []
        for view in self.files:
            problems += [f"{os.path.basename(view.path)}: {p}" for p in view.check(progress)]
        return problems

    def close(self) -> None:
        for view in self.files:
            view.close()
