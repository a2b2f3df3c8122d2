"""Deployment artifacts with ``torch.export``: a graph that runs without the model's Python class.

``export_model`` writes the ``torch.export.save`` archive atomically. That archive is a zip of
JSON (the graph), raw weight bytes, and a few ``torch.save`` pickles (sample inputs; weights
that are not plain dense tensors). ``torch.export.load`` unpickles those with the weights-only
unpickler but *falls back to the full unpickler* when that fails, so it can run code from a
hostile file; it also loads compiled libraries, ``sympify``s (evaluates) expression strings and
``exec``s guards code from the archive. ``load_exported`` checks all of that statically first
(:mod:`torchkeep.readers.export_archive`; nothing is run) and refuses what it cannot prove
harmless unless ``trusted=True``.
"""

from __future__ import annotations

import io
import os
import zipfile
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointNotFoundError, FormatError, TorchkeepError
from ..readers.containers import ScanResult
from ..readers.export_archive import is_export_archive, scan_export_archive
from ..readers.torch_file import refusal, unsafe_globals
from ..storage.io import ops, write_all
from ..storage.local import atomic_file
from .capture import unwrap
from .export_load import load_untrusted

PathLike = str | os.PathLike


def export_model(
    model: nn.Module,
    path: PathLike,
    example_inputs: Sequence[Any] | Any,
    *,
    example_kwargs: dict[str, Any] | None = None,
    dynamic_shapes: Any = None,
    strict: bool = False,
) -> torch.export.ExportedProgram:
    """Export ``model`` (in eval mode) with ``torch.export`` and write the archive atomically.

    ``example_inputs`` is a tuple of positional inputs (a single tensor is accepted). The file
    loads with ``torch.export.load`` or :func:`load_exported` without the model's class.
    """
    if isinstance(example_inputs, torch.Tensor) or not isinstance(example_inputs, Sequence):
        example_inputs = (example_inputs,)
    model = unwrap(model)
    was_training = model.training
    model.eval()
    try:
        program = torch.export.export(
            model, tuple(example_inputs), example_kwargs, dynamic_shapes=dynamic_shapes,
            strict=strict,
        )  # fmt: skip
    except Exception as exc:  # noqa: BLE001 - torch raises many types; say what failed
        raise TorchkeepError(
            f"torch.export could not trace {type(model).__name__} for {os.fspath(path)!r} "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); fix the "
            "model's data-dependent control flow (torch.cond, or branch outside forward) or "
            "pass dynamic_shapes; nothing was written"
        ) from exc
    finally:
        model.train(was_training)
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    data = buffer.getbuffer()
    with atomic_file(os.fspath(path), data.nbytes) as fd:
        write_all(ops(), fd, memoryview(data), 0)
    return program


def scan_archive(path: str) -> ScanResult:
    """Every pickle, compiled library and code string in an export archive, found statically."""
    return scan_export_archive(path)


def load_exported(path: PathLike, *, trusted: bool = False) -> torch.export.ExportedProgram:
    """An exported program, read without running code from the archive unless trusted.

    Untrusted (the default): a static check first refuses (:class:`UnsafeFileError`) an archive
    whose pickles need globals outside the weights-only allow-list, or that holds anything it
    cannot prove harmless (compiled AOTInductor code, TorchScript objects, symbolic expressions
    that are not arithmetic, graph nodes that call something other than an operator, guards
    code); then the parts are read by torchkeep with every pickle weights-only
    (:mod:`.export_load`), never through ``torch.export.load``'s full-unpickler paths.
    ``trusted=True`` is ``torch.export.load`` unchanged. Run it with ``program.module()(*x)``.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointNotFoundError(f"{path}: no such file")
    if not zipfile.is_zipfile(path) or not (trusted or is_export_archive(path)):
        raise FormatError(
            f"{path}: not a torch.export archive (written by export_model or torch.export.save "
            "with torch 2.8 or later; an older archive loads only with trusted=True)"
        )
    if not trusted:
        scan = scan_archive(path)
        if unsafe_globals(scan):
            raise refusal(path, scan, " (inside the torch.export archive)")
        return load_untrusted(path)
    try:
        return torch.export.load(path)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for a bad archive
        raise FormatError(
            f"{path}: torch.export.load failed ({type(exc).__name__}: {exc})"
        ) from exc
