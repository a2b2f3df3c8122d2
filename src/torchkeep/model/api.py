"""save_model / load_model / convert_legacy: whole models in torchkeep files, without pickle.

A whole-model file is an ordinary torchkeep file (opens with stock safetensors). Its top level is
the model's state dict (same keys as ``model.state_dict()``, so ``load_state_dict(model, path)``
works on it too) plus one entry, ``__torchkeep_model__``, holding the module description from
:mod:`.capture` and the non-persistent buffers. The header metadata marks the kind.
"""

from __future__ import annotations

import os
import warnings

import torch
from torch import nn

from ..engine import save
from ..errors import FormatError, TorchkeepError
from ..readers import detect
from ..readers.torch_file import load_torch_file
from ..transfer.reader import FileReader, MapLocation
from . import fit
from .capture import capture
from .rebuild import ClassesArg, ClassResolver, Rebuilder

PathLike = str | os.PathLike
MODEL_ENTRY = "__torchkeep_model__"
KIND_KEY, KIND_VALUE = "torchkeep_kind", "model"
LAYOUT_VERSION = 1
#: Layout 2 adds per-module ``values`` (classes, configuration objects) and the ``objects`` table;
#: a file without them is written as layout 1, so older torchkeep versions still read it.
LAYOUTS = (1, 2)


def save_model(
    model: nn.Module,
    path: PathLike,
    *,
    metadata: dict[str, str] | None = None,
    drop_hooks: bool = False,
) -> None:
    """Save the whole ``model`` (structure and weights) to ``path`` atomically, without pickle.

    Classes are recorded by import path; attributes must be plain data, classes, configuration
    objects whose state is plain data (``PretrainedConfig``, dataclasses), ``functools.partial``
    of those, or functions of ``torch.nn.functional``/``torch``/``operator``. Anything else, and
    registered hooks unless ``drop_hooks=True``, raises :class:`UnsupportedValueError` naming the
    attribute path before any byte is written. torch.compile / DataParallel / DDP wrappers are
    removed.
    """
    described = capture(model, drop_hooks=drop_hooks)
    if described.hooks_dropped:
        warnings.warn(
            f"save_model({os.fspath(path)!r}): hooks not saved: "
            + ", ".join(described.hooks_dropped[:8]),
            stacklevel=2,
        )
    if described.needs_trust:
        listing = "; ".join(f"{c} ({', '.join(h)})" for c, h in described.needs_trust.items())
        warnings.warn(
            f"save_model({os.fspath(path)!r}): classes with their own special methods will need "
            f"load_model(..., trusted=True), which runs them: {listing[:400]}",
            stacklevel=2,
        )
    if MODEL_ENTRY in described.tensors:
        raise TorchkeepError(f"the model has a tensor named {MODEL_ENTRY!r}; rename it")
    entry = {"version": LAYOUT_VERSION, "root": described.root, "extra": described.extra}
    if described.objects or _has_values(described.root):
        entry.update(version=2, objects=described.objects)
    meta = {**(metadata or {}), KIND_KEY: KIND_VALUE}
    save({**described.tensors, MODEL_ENTRY: entry}, path, metadata=meta)


def load_model(
    path: PathLike,
    *,
    map_location: MapLocation = None,
    classes: ClassesArg = None,
    trusted: bool = False,
    verify: bool = True,
    check_fit: bool = True,
) -> nn.Module:
    """Rebuild a model saved by :func:`save_model` (or, with ``trusted=True``, ``torch.save``).

    Classes (of modules, class-valued attributes and configuration objects) resolve only when
    allowed: ``torch.nn``, ``classes=[...]`` (or a dict mapping saved ``module:qualname`` to a
    class that moved), classes whose module is already imported, and with ``trusted=True`` any
    importable class. No code of a class named by the file runs unless ``trusted=True``: no
    ``__init__``, and a class with its own ``__new__``/``__setstate__``/``__del__``/
    ``__getattribute__`` is refused. The model comes back in ``eval()`` mode. ``check_fit``
    compares it with the current source of its classes (parsed, not run; with ``trusted=True``
    also their constructors on the meta device) and raises :class:`StateDictMismatchError` with
    a table when the architecture changed.
    """
    path = os.fspath(path)
    if detect.sniff(path) != detect.SAFETENSORS:
        return _load_pickled(path, map_location, trusted)
    with FileReader(path) as reader:
        if reader.metadata.get(KIND_KEY) != KIND_VALUE:
            raise FormatError(
                f"{path}: holds no whole model (it was written by torchkeep.save or is a plain "
                "safetensors file); build the model and use torchkeep.load_state_dict(model, "
                "path), or torchkeep.load(path) for the raw contents"
            )
        content = reader.load(map_location=map_location, verify=verify)
    entry = content.pop(MODEL_ENTRY, None) if isinstance(content, dict) else None
    if not isinstance(entry, dict) or entry.get("version") not in LAYOUTS:
        raise FormatError(
            f"{path}: the whole-model entry is missing or of an unknown layout version; "
            "upgrade torchkeep or re-save the model"
        )
    extra = entry.get("extra") or {}
    if not isinstance(extra, dict):
        raise FormatError(f"{path}: the whole-model entry's 'extra' is malformed")
    tensors = {k: v for k, v in {**content, **extra}.items() if isinstance(v, torch.Tensor)}
    objects = entry.get("objects") if entry["version"] == 2 else None
    rebuilder = Rebuilder(ClassResolver(classes, trusted, path), tensors, path, objects)
    model = rebuilder.module(entry.get("root"), "")
    if check_fit:
        fit.check_fit(entry["root"], model, path, trusted=trusted)
    return model.eval()


def _has_values(node: dict) -> bool:
    stack = [node]
    while stack:
        current = stack.pop()
        if current.get("values"):
            return True
        stack += [c for c in current.get("modules", {}).values() if isinstance(c, dict)]
    return False


def _load_pickled(path: str, map_location: MapLocation, trusted: bool) -> nn.Module:
    """A ``torch.save(model)`` file: refused (UnsafeFileError) unless ``trusted=True``."""
    obj = load_torch_file(path, map_location=map_location, trusted=trusted)
    if not isinstance(obj, nn.Module):
        raise FormatError(
            f"{path}: holds a {type(obj).__qualname__}, not a model (a state dict or checkpoint "
            "dict); build the model and use torchkeep.load_state_dict(model, path)"
        )
    return obj.eval()


def convert_legacy(
    src: PathLike, dst: PathLike, *, trusted: bool = False, drop_hooks: bool = False
) -> nn.Module:
    """Migrate a ``torch.save(model)`` file to a safe whole-model file once; returns the model.

    Unpickling the source needs ``trusted=True`` (it can run code); later loads of ``dst`` need
    no trust. The model's class must be importable here.
    """
    model = load_model(src, trusted=trusted, check_fit=False)
    save_model(model, dst, drop_hooks=drop_hooks)
    return model
