"""Views of torchkeep manager run directories (one committed checkpoint per step).

The layout belongs to :mod:`torchkeep.storage.run_dir` (``list_steps``/``list_leftovers``); this
module only reads it. A run directory is seen as its newest step; ``check`` verifies every step.
"""

from __future__ import annotations

import os
import stat
from typing import Any

from ..errors import FormatError, TorchkeepError, UnsafePathError
from ..storage.run_dir import STATE_FILE, join, list_leftovers, list_steps
from ..storage.urls import backend_for, is_url
from .file_view import open_file_view
from .view import CheckpointView


def open_step(path: str, trusted: bool = False) -> CheckpointView:
    """A view of one step: its file, or the checkpoint files of its folder by stem.

    Nothing in a step is followed out of it: links and special files are refused.
    """
    if is_url(path):  # an object-store step: its state file is the checkpoint
        return open_file_view(join(path, STATE_FILE), trusted)
    if not stat.S_ISDIR(os.lstat(path).st_mode):
        return open_file_view(path, trusted, follow_symlinks=False)
    return StepFolderView(path, trusted)


class StepFolderView(CheckpointView):
    """A step folder holding several checkpoint files; each becomes a top-level entry."""

    def __init__(self, folder: str, trusted: bool = False) -> None:
        self.parts: list[CheckpointView] = []
        skeleton: dict[str, Any] = {}
        try:
            for name in sorted(os.listdir(folder)):
                full = os.path.join(folder, name)
                if name.startswith(".") or stat.S_ISDIR(os.lstat(full).st_mode):
                    continue
                try:
                    view = open_file_view(full, trusted, follow_symlinks=False)
                except UnsafePathError:
                    raise  # a planted link or FIFO is an error, not a sidecar to skip
                except FormatError:
                    continue  # not a checkpoint file (e.g. a JSON sidecar)
                self.parts.append(view)
                skeleton[name.split(".", 1)[0]] = view.skeleton
            if not self.parts:
                raise FormatError(f"{folder}: step folder holds no checkpoint file")
            if len(self.parts) == 1:  # the usual step: one state file, names without prefix
                only = self.parts[0]
                super().__init__(folder, only.format, only.skeleton, only.notes)
            else:
                super().__init__(folder, "torchkeep-step", skeleton)
        except BaseException:
            self.close()
            raise
        self.checksum_algorithm = self.parts[0].checksum_algorithm

    def check(self, progress: Any = None) -> list[str]:
        return [f"{os.path.basename(v.path)}: {p}" for v in self.parts for p in v.check(progress)]

    def close(self) -> None:
        for view in self.parts:
            view.close()


class RunView(CheckpointView):
    """A run directory, shown as its newest committed step."""

    def __init__(self, path: str, trusted: bool = False) -> None:
        backend = backend_for(path)
        self.steps = list_steps(path, backend)
        if not self.steps:
            raise FormatError(f"{path}: run directory holds no committed step")
        self.trusted = trusted
        self.latest = open_step(self.steps[-1].path, trusted)
        notes = list(self.latest.notes)
        notes += [f"{p}: incomplete save (ignored; swept on the next run)"
                  for p in list_leftovers(path, backend)]  # fmt: skip
        super().__init__(path, "torchkeep-run", self.latest.skeleton, notes)
        self.refs = self.latest.refs
        self.checksum_algorithm = self.latest.checksum_algorithm
        self.step = self.steps[-1].step

    def check(self, progress: Any = None) -> list[str]:
        problems = []
        for info in self.steps:
            try:
                with open_step(info.path, self.trusted) as view:
                    problems += [f"step {info.step}: {p}" for p in view.check(progress)]
            except TorchkeepError as exc:
                problems.append(f"step {info.step}: {exc}")
        return problems

    def close(self) -> None:
        self.latest.close()
