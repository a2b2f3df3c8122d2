"""Read ``torch.distributed.checkpoint`` directories without unpickling untrusted metadata.

DCP pickles its ``.metadata`` file. torchkeep reads it with a restricted unpickler that can only
build DCP's own metadata dataclasses, torch sizes/dtypes and plain builtins; any other global
raises :class:`UnsafeFileError` (nothing is executed) unless ``trusted=True``. Tensor chunks in
the ``.distcp`` files are ``torch.save`` blobs, loaded with the weights-only unpickler.
"""

from __future__ import annotations

import io
import os
import pickle
import zipfile
from typing import Any

import torch

from .. import knobs
from ..errors import FormatError, UnsafeFileError
from . import safe_globals
from .dcp_check import RANK_METADATA, check_metadata, check_relative, read_range, read_regular
from .pickle_scan import ScanResult, scan_stream
from .torch_file import check_object_bytes, unsafe_globals
from .view import CheckpointView, Ref, skeleton_of

METADATA_NAME = ".metadata"
_DCP = "torch.distributed.checkpoint.metadata"
_ALLOWED = {
    (_DCP, n)
    for n in (
        "Metadata", "TensorStorageMetadata", "TensorProperties", "ChunkStorageMetadata",
        "BytesStorageMetadata", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING",
    )
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("collections", "OrderedDict"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "tuple"),
}  # fmt: skip


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, path: str) -> None:
        super().__init__(io.BytesIO(data))
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if (module, name) not in _ALLOWED:
            raise UnsafeFileError(
                f"{self.path}: DCP metadata needs {module}.{name}, which is not one of DCP's "
                "metadata types; nothing was executed. Pass trusted=True (CLI: --trusted) only "
                "if you trust this checkpoint",
                globals=[f"{module}.{name}"],
            )
        return super().find_class(module, name)


def read_metadata(folder: str, trusted: bool = False) -> Any:
    """The DCP ``Metadata`` object of ``folder``, built by the restricted unpickler.

    Without a global ``.metadata``, the per-rank ``__R.metadata`` files that
    ``dcp.save(..., use_collectives=False)`` writes are read and merged (chunks of one tensor
    from several ranks joined), then validated as one.
    """
    path = os.path.join(folder, METADATA_NAME)
    if not os.path.lexists(path):
        ranks = sorted(n for n in os.listdir(folder) if RANK_METADATA.match(n))
        if ranks:
            parts = [_read_one(os.path.join(folder, n), trusted) for n in ranks[:MAX_RANK_FILES]]
            if len(ranks) > MAX_RANK_FILES:
                raise FormatError(f"{folder}: more than {MAX_RANK_FILES} per-rank metadata files")
            meta = _merge([m for m, _n in parts], folder)
            check_metadata(meta, folder, sum(n for _m, n in parts))
            return meta
    meta, size = _read_one(path, trusted)
    check_metadata(meta, folder, size)
    return meta


#: Most per-rank metadata files merged (one per rank).
MAX_RANK_FILES = 1 << 16


def _read_one(path: str, trusted: bool) -> tuple[Any, int]:
    data = read_regular(path, knobs.MAX_HEADER_BYTES, "DCP metadata")
    try:
        if trusted:
            meta = pickle.loads(data)  # noqa: S301 - the caller trusts this checkpoint
        else:
            import torch.distributed.checkpoint  # noqa: F401 - registers the dataclasses

            _scan_metadata(data, path)
            meta = _MetadataUnpickler(data, path).load()
    except UnsafeFileError:
        raise
    except Exception as exc:  # noqa: BLE001 - any garbled pickle is a format error
        raise FormatError(f"{path}: not a readable DCP metadata file ({exc})") from exc
    if not hasattr(meta, "state_dict_metadata") or not hasattr(meta, "storage_data"):
        raise FormatError(f"{path}: not DCP metadata (got {type(meta).__name__})")
    return meta, len(data)


def _merge(metas: list[Any], folder: str) -> Any:
    """One metadata from the per-rank ones: every tensor's chunks, every storage location."""
    merged = metas[0]
    items: dict = {}
    storage: dict = {}
    planner: dict = {}
    for meta in metas:
        if not isinstance(meta.state_dict_metadata, dict) or not isinstance(
            meta.storage_data, dict
        ):
            raise FormatError(f"{folder}: per-rank DCP metadata without its tables")
        for fqn, item in meta.state_dict_metadata.items():
            known = items.get(fqn)
            if known is None or not hasattr(item, "chunks"):
                items.setdefault(fqn, item)
                continue
            if not hasattr(known, "chunks") or list(known.size) != list(item.size):
                raise FormatError(f"{folder}: ranks disagree on the shape of {fqn!r}")
            known.chunks = list(known.chunks) + list(item.chunks)
        storage.update(meta.storage_data)
        if isinstance(getattr(meta, "planner_data", None), dict):
            planner.update(meta.planner_data)
    merged.state_dict_metadata, merged.storage_data = items, storage
    merged.planner_data = planner or getattr(merged, "planner_data", None)
    return merged


def _scan_metadata(data: bytes, path: str) -> None:
    """The unpickler builds the metadata's dicts itself: prove first that none is a hash flood.

    Globals are checked by :class:`_MetadataUnpickler` as it goes. The scan (linear time)
    refuses colliding keys, a pickle too large for it to see whole, and anything it cannot
    resolve: past such a point it cannot say what the unpickler would build.
    """
    result = ScanResult()
    scan_stream(data, result, METADATA_NAME)
    if result.problems:
        raise UnsafeFileError(
            f"{path}: refused to unpickle DCP metadata: the scan cannot prove it harmless "
            f"({'; '.join(result.problems[:4])}); nothing was executed. Pass trusted=True "
            "(CLI: --trusted) only if you trust this checkpoint",
            globals=[],
        )


def scan_blob(data: bytes) -> ScanResult:
    """Globals referenced by one DCP item (a torch.save zip, or a bare pickle), not run."""
    result = ScanResult()
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            for name in archive.namelist():
                if name.endswith(".pkl"):
                    scan_stream(archive.read(name), result, name)
    except (zipfile.BadZipFile, OSError, ValueError, RuntimeError):
        scan_stream(data, result, "pickle")
    return result


def _refuse_unsafe_blob(data: bytes, where: str) -> None:
    """Refuse a DCP item whose pickles import disallowed globals or cannot be resolved."""
    bad = unsafe_globals(scan_blob(data))
    if bad:
        raise UnsafeFileError(
            f"{where}: refused to unpickle a DCP value ({'; '.join(bad[:4])}); nothing was "
            "executed. Pass trusted=True (CLI: --trusted) only if you trust this checkpoint",
            globals=[g for g in bad if not g.startswith("unresolved: ")],
        )


def read_blob(folder: str, info: Any) -> bytes:
    """The bytes of one DCP item, its location validated against the folder."""
    rel = info.relative_path
    check_relative(rel, folder)
    if getattr(info, "transform_descriptors", None):
        raise FormatError(f"{folder}/{rel}: DCP transforms are not supported")
    offset, length = info.offset, info.length
    if type(offset) is not int or type(length) is not int or offset < 0 or length < 0:
        raise FormatError(f"{folder}/{rel}: DCP item has a bad byte range {offset!r}+{length!r}")
    return read_range(os.path.join(folder, rel), offset, length)


class DcpView(CheckpointView):
    """A DCP checkpoint directory; tensors are assembled from their chunks on demand."""

    def __init__(self, folder: str, trusted: bool = False) -> None:
        self.folder = folder
        self.trusted = trusted
        self.meta = read_metadata(folder, trusted)
        self._index: dict[str, list[tuple[Any, Any]]] = {}
        for index, info in self.meta.storage_data.items():
            self._index.setdefault(index.fqn, []).append((index, info))
        flat: dict[str, Any] = {}
        for fqn, item in self.meta.state_dict_metadata.items():
            if hasattr(item, "chunks"):
                flat[fqn] = self._tensor_ref(fqn, item)
            else:
                flat[fqn] = self._load_bytes(fqn)
        super().__init__(folder, "dcp", _nest(flat, getattr(self.meta, "planner_data", None)))

    def _blob(self, info: Any) -> bytes:
        return read_blob(self.folder, info)

    def _torch_load(self, data: bytes, where: str) -> Any:
        try:
            if self.trusted:
                return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)
            _refuse_unsafe_blob(data, where)  # before torch's unpickler builds anything
            with safe_globals.allowed():  # NumPy values through checked stand-ins
                value = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
            return safe_globals.resolve(value)
        except UnsafeFileError:
            raise
        except pickle.UnpicklingError as exc:
            bad = unsafe_globals(scan_blob(data))
            raise UnsafeFileError(
                f"{where}: refused to unpickle a DCP value: it needs globals outside the "
                f"weights-only allow-list ({', '.join(bad) or 'unknown'}); nothing was executed. "
                "Pass trusted=True (CLI: --trusted) only if you trust this checkpoint",
                globals=bad,
            ) from exc
        except Exception as exc:  # noqa: BLE001 - garbled bytes
            raise FormatError(f"{where}: unreadable DCP item ({exc})") from exc

    def _load_bytes(self, fqn: str) -> Any:
        (_, info), *_ = self._index.get(fqn) or [(None, None)]
        if info is None:
            raise FormatError(f"{self.folder}: DCP metadata lists {fqn!r} without storage")
        blob = self._blob(info)
        value = self._torch_load(blob, f"{self.folder}: {fqn}")
        check_object_bytes(value, len(blob), f"{self.folder}: {fqn}")
        return skeleton_of(value, fqn, f"{self.folder}: {fqn}")

    def _tensor_ref(self, fqn: str, item: Any) -> Ref:
        shape = tuple(int(d) for d in item.size)
        dtype = item.properties.dtype
        if not isinstance(dtype, torch.dtype):
            raise FormatError(f"{self.folder}: DCP tensor {fqn!r} has no valid dtype")
        return Ref(fqn, dtype, shape, lambda: self._assemble(fqn, shape, dtype))

    def _assemble(self, fqn: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        out = torch.empty(shape, dtype=dtype)
        for index, info in self._index.get(fqn, []):
            chunk = self._torch_load(self._blob(info), f"{self.folder}: {fqn}")
            if not isinstance(chunk, torch.Tensor) or chunk.dtype != dtype:
                raise FormatError(f"{self.folder}: DCP chunk of {fqn!r} is not a {dtype} tensor")
            offsets = tuple(index.offset or (0,) * len(shape))
            if len(offsets) != len(shape) or chunk.dim() != len(shape):
                raise FormatError(f"{self.folder}: DCP chunk of {fqn!r} has the wrong rank")
            region = out
            for dim, (start, length) in enumerate(zip(offsets, chunk.shape)):
                if start + length > shape[dim]:
                    raise FormatError(f"{self.folder}: DCP chunk of {fqn!r} is out of bounds")
                region = region.narrow(dim, start, length)
            region.copy_(chunk)
        return out


def _nest(flat: dict[str, Any], planner_data: Any) -> dict:
    """Rebuild the nesting DCP flattened, from ``planner_data`` paths when it has them."""
    root: dict = {}
    for fqn, value in flat.items():
        path = planner_data.get(fqn) if isinstance(planner_data, dict) else None
        parts = list(path) if isinstance(path, (tuple, list)) and path else [fqn]
        node = root
        for part in parts[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = node[part] = {}
            node = child
        node[parts[-1]] = value
    return root
