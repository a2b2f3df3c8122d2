"""Load a ``torch.export`` archive without ``torch.export.load``'s pickle fallbacks.

torch 2.13's loader unpickles pickled weights and constants with ``weights_only=False`` and
retries failed sample inputs with the full unpickler. For an untrusted archive torchkeep reads
the parts itself instead: the graph JSON through torch's schema, raw weights and constants as
bytes viewed with the strides the archive's configs give (bounds-checked by torch), and every
pickled part (already proven harmless by the static scan) through the weights-only unpickler;
then torch's ``ExportedProgramDeserializer`` builds the program from those values. TorchScript
and opaque objects, and AOTInductor code, are never read here (the scan refuses them first).
"""

from __future__ import annotations

import functools
import importlib
import io
import json
import zipfile
from types import ModuleType
from typing import Any

import torch

from .. import knobs
from ..errors import FormatError, UnsafeFileError

_MODEL = "model"


# torch's export deserializer is imported on first use, not with torchkeep: importing it costs
# seconds (it pulls in sympy) and only an untrusted load_exported needs it.
@functools.cache
def _serde() -> ModuleType:
    return importlib.import_module("torch._export.serde.serialize")


@functools.cache
def _schema() -> ModuleType:
    return importlib.import_module("torch._export.serde.schema")


class _Archive:
    """Members of a ``.pt2`` zip by their name below the archive's top folder."""

    def __init__(self, zf: zipfile.ZipFile, path: str) -> None:
        self.zf, self.path = zf, path
        self.names = {n.split("/", 1)[1]: n for n in zf.namelist() if "/" in n}

    def read(self, rel: str) -> bytes:
        if rel not in self.names:
            raise FormatError(f"{self.path}: the archive has no {rel}")
        info = self.zf.getinfo(self.names[rel])
        if info.compress_type != zipfile.ZIP_STORED and info.file_size > max(
            knobs.SCAN_MAX_PICKLE_BYTES, 64 * info.compress_size
        ):  # torch writes members stored; a deflated giant is a bomb, not a weight
            raise FormatError(
                f"{self.path}: {rel} inflates to {info.file_size} bytes from "
                f"{info.compress_size}; refused (torch.export.save stores members uncompressed)"
            )
        return self.zf.read(info)

    def json(self, rel: str) -> Any:
        info = self.zf.getinfo(self.names[rel]) if rel in self.names else None
        if info is not None and info.file_size > knobs.MAX_HEADER_BYTES:
            raise FormatError(f"{self.path}: {rel} is {info.file_size} bytes, over the cap")
        return json.loads(self.read(rel))


def _weights_only(data: bytes, where: str) -> Any:
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for a refused pickle
        raise UnsafeFileError(
            f"{where}: torch's weights-only unpickler refused it ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}); nothing was executed. Pass "
            "trusted=True only if you trust the archive"
        ) from exc


def _raw_tensor(archive: _Archive, rel: str, meta: Any, cache: dict) -> torch.Tensor:
    """A raw payload viewed with the archive's sizes and strides (aliases share storage)."""
    dtype = _serde().deserialize_scalar_type(meta.dtype)
    size, stride = _serde().deserialize_size(meta.sizes), _serde().deserialize_stride(meta.strides)
    if rel not in cache:
        data = archive.read(rel)
        item = torch.empty((), dtype=dtype).element_size()
        if len(data) % item:
            raise FormatError(f"{archive.path}: {rel} is not a whole number of {dtype} elements")
        flat = torch.frombuffer(bytearray(data), dtype=dtype) if data else None
        cache[rel] = flat
    flat = cache[rel]
    if flat is None:
        return torch.zeros(size, dtype=dtype)
    return torch.as_strided(
        flat, size, stride, _serde().deserialize_storage_offset(meta.storage_offset)
    )


def _payloads(archive: _Archive, folder: str, kind: str) -> dict[str, Any]:
    """Weights or constants of the model, raw ones viewed, pickled ones weights-only."""
    legacy = f"{folder}{_MODEL}.pt"
    if legacy in archive.names:
        return _weights_only(archive.read(legacy), f"{archive.path}: {legacy}")
    config = _serde()._dict_to_dataclass(
        _schema().PayloadConfig, archive.json(f"{folder}{_MODEL}_{kind}_config.json")
    )
    out: dict[str, Any] = {}
    cache: dict[str, Any] = {}
    for fqn, payload in config.config.items():
        rel = folder + payload.path_name
        if payload.use_pickle:
            out[fqn] = _weights_only(archive.read(rel), f"{archive.path}: {rel}")
            continue
        meta = payload.tensor_meta
        if meta is None:
            raise FormatError(f"{archive.path}: {rel} ({fqn}) has no tensor metadata")
        tensor = _raw_tensor(archive, rel, meta, cache)
        device = _serde().deserialize_device(meta.device)
        if device.type != "cpu":
            tensor = tensor.to(device)
        if payload.is_param:
            tensor = torch.nn.Parameter(tensor, requires_grad=meta.requires_grad)
        out[fqn] = tensor
    return out


def load_untrusted(path: str) -> torch.export.ExportedProgram:
    """The archive's ``model`` program, every pickle read weights-only (no fallback)."""
    try:
        with zipfile.ZipFile(path) as zf:
            archive = _Archive(zf, path)
            program = _serde()._bytes_to_dataclass(
                _schema().ExportedProgram, archive.read(f"models/{_MODEL}.json")
            )
            state_dict = _payloads(archive, "data/weights/", "weights")
            constants = _payloads(archive, "data/constants/", "constants")
            sample = f"data/sample_inputs/{_MODEL}.pt"
            inputs = archive.read(sample) if sample in archive.names else b""
            example = _weights_only(inputs, f"{path}: {sample}") if inputs else None
            return (
                _serde()
                .ExportedProgramDeserializer()
                .deserialize(program, state_dict, constants, example)
            )
    except (UnsafeFileError, FormatError):
        raise
    except Exception as exc:  # noqa: BLE001 - torch's deserializer raises many types
        raise FormatError(
            f"{path}: not a loadable torch.export archive ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''})"
        ) from exc
