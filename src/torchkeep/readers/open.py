"""Open any checkpoint users have as a :class:`CheckpointView`, format detected by content."""

from __future__ import annotations

import os
import warnings
from typing import Any

import torch

from ..errors import FormatError
from . import detect
from .dcp import DcpView
from .dcp_safetensors import DcpSafetensorsView
from .file_view import open_file_view
from .folders import AccelerateView, TrainerView
from .run_dir import RunView, open_step
from .safetensors_view import ShardedView
from .view import CheckpointView


def open_view(path: str | os.PathLike, trusted: bool = False) -> CheckpointView:
    """A view of the checkpoint at ``path`` (file or folder); pickles only run if ``trusted``."""
    path = os.fspath(path)
    kind = detect.sniff(path)
    if kind in (detect.SAFETENSORS, detect.TORCH_ZIP, detect.TORCH_LEGACY):
        return open_file_view(path, trusted)
    if kind == detect.HF_SHARDED:
        return ShardedView(path)
    if kind == detect.DCP:
        return DcpView(path, trusted)
    if kind == detect.DCP_SAFETENSORS:
        return DcpSafetensorsView(path)
    if kind == detect.ACCELERATE:
        return AccelerateView(path, trusted)
    if kind == detect.HF_TRAINER:
        return TrainerView(path, trusted)
    if kind == detect.RUN_DIR:
        return RunView(path, trusted)
    if kind == detect.RUN_STEP:
        return open_step(path, trusted)
    raise FormatError(f"{path}: format {kind!r} has no reader")


def load_folder(path: str, map_location: Any = None, trusted: bool = False) -> Any:
    """The whole object of a folder checkpoint (HF shards, DCP, Accelerate, run directory).

    Tensors go to ``map_location`` when it names one device (folders are read to CPU).
    """
    with open_view(path, trusted=trusted) as view:
        obj = view.materialize()
        for note in view.notes:  # e.g. a pickle left out because it needs trusted=True
            warnings.warn(f"{path}: {note}", stacklevel=3)
    if isinstance(map_location, (str, torch.device)) and torch.device(map_location).type != "cpu":
        target = torch.device(map_location)
        return map_tensors(obj, lambda t: t.to(target))
    return obj


def map_tensors(obj: Any, fn: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        return type(obj)((k, map_tensors(v, fn)) for k, v in obj.items())
    if isinstance(obj, list):
        return [map_tensors(v, fn) for v in obj]
    if isinstance(obj, tuple) and type(obj) is tuple:
        return tuple(map_tensors(v, fn) for v in obj)
    return obj
