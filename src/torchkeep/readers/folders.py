"""Views of folder checkpoints written by frameworks: Accelerate ``save_state`` folders and
Hugging Face ``Trainer`` ``checkpoint-N/`` folders.

Each file becomes a top-level entry named after its stem (``model``, ``optimizer``,
``rng_state``, ``random_states_0``); JSON files (``trainer_state.json``, ``config.json``) become
their values. Pickles go through the weights-only rules (NumPy RNG states included, see
``safe_globals``); a pickle those rules refuse, such as ``training_args.bin`` (a pickled
``TrainingArguments`` object), is listed with the globals it imports and skipped unless the
caller trusts the folder. Only regular files of the folder are read (``storage/paths.py``): a
link leading outside it (other than a hub cache's ``blobs/``), a FIFO or a device is skipped
with a note, so a prepared folder cannot point a reader elsewhere.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

from ..errors import FormatError, UnsafeFileError, UnsafePathError
from ..storage.paths import inside, open_regular, read_capped
from . import detect
from .detect import ACCELERATE_MODEL, ACCELERATE_STATE
from .safetensors_view import INDEX_NAME, FileView, ShardedView
from .torch_file import load_torch_file
from .view import CheckpointView, skeleton_of

_TRAINER_FILES = re.compile(
    r"^(optimizer\.pt|scheduler\.pt|scaler\.pt|rng_state(_\d+)?\.pth|training_args\.bin|"
    r"trainer_state\.json|training_args\.json|config\.json|generation_config\.json|"
    r"[\w.-]+\.tk)$"
)
MAX_JSON_BYTES = 64 << 20


class FolderView(CheckpointView):
    """A framework folder; model weights stay lazy, small state files are loaded."""

    def __init__(self, folder: str, fmt: str, wanted: re.Pattern, trusted: bool = False) -> None:
        self.files: list[CheckpointView] = []
        self.trusted = trusted
        skeleton: dict[str, Any] = {}
        notes: list[str] = []
        try:
            names = sorted(os.listdir(folder))
            if INDEX_NAME in names:  # a sharded model inside the folder
                view = ShardedView(folder)
                self.files.append(view)
                skeleton["model"] = view.skeleton
            for name in names:
                if not (ACCELERATE_MODEL.match(name) or wanted.match(name)):
                    continue
                try:  # a link is followed only inside the folder (or a hub cache's blobs/)
                    path = inside(folder, name, folder)
                    os.close(open_regular(path))  # FIFOs, devices, folders: refused, no block
                except UnsafePathError as exc:
                    notes.append(f"{name}: skipped: {exc}")
                    continue
                try:
                    skeleton[name.rsplit(".", 1)[0]] = self._load(path)
                except UnsafeFileError as exc:
                    notes.append(_pickle_note(name, exc))
            super().__init__(folder, fmt, skeleton, notes)
        except BaseException:
            self.close()
            raise

    def _load(self, path: str) -> Any:
        if path.endswith(".json"):
            return read_json(path)
        kind = detect.sniff_file(path)
        if kind == detect.SAFETENSORS:
            view = FileView(path)
            self.files.append(view)
            return view.skeleton
        obj = load_torch_file(path, map_location="cpu", trusted=self.trusted)
        return skeleton_of(obj, os.path.basename(path).rsplit(".", 1)[0])

    def check(self, progress: Any = None) -> list[str]:
        problems = []
        for view in self.files:
            name = os.path.basename(view.path)
            problems += [f"{name}: {p}" for p in view.check(progress)]
        return problems

    def close(self) -> None:
        for view in self.files:
            view.close()


def _pickle_note(name: str, exc: UnsafeFileError) -> str:
    shown = ", ".join(exc.globals[:4]) + (" ..." if len(exc.globals) > 4 else "")
    what = f"importing {shown}" if shown else "holding values outside the weights-only rules"
    return f"{name}: a pickle {what}; skipped, needs --trusted (trusted=True) to load"


def read_json(path: str) -> Any:
    """A small JSON file of the folder, opened without following symlinks, size-capped."""
    try:
        raw = read_capped(path, MAX_JSON_BYTES, "not a state file")
    except OSError as exc:
        raise FormatError(f"{path}: cannot open ({exc.strerror})") from exc
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise FormatError(f"{path}: not valid JSON ({exc})") from exc


class AccelerateView(FolderView):
    """An Accelerate ``save_state`` folder."""

    def __init__(self, folder: str, trusted: bool = False) -> None:
        super().__init__(folder, detect.ACCELERATE, ACCELERATE_STATE, trusted)


class TrainerView(FolderView):
    """A Hugging Face ``Trainer`` ``checkpoint-N/`` folder."""

    def __init__(self, folder: str, trusted: bool = False) -> None:
        super().__init__(folder, detect.HF_TRAINER, _TRAINER_FILES, trusted)
