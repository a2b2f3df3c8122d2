"""The global metadata of a sharded checkpoint as JSON (never a pickle), and its validation.

DCP keeps its ``Metadata`` (global shapes, the chunks each rank wrote, the flattening map of
nested state dicts) in a pickled ``.metadata`` file. torchkeep writes the same facts as plain
JSON, ``checkpoint.json``, and rebuilds DCP's ``Metadata`` from it after checking every number
(``chunks.py``): a hostile file raises :class:`FormatError` naming itself.

Schema (version 1)::

    {"torchkeep_dcp": 1, "world_size": 2, "dcp_version": "1.0.0",
     "files": ["rank-00000.safetensors", "rank-00001.safetensors"],
     "tensors": {fqn: {"dtype": "float32", "shape": [8, 4],
                       "chunks": [{"offsets": [0, 0], "sizes": [4, 4], "file": 0, "name": n}]}},
     "values": {fqn: {"file": 0, "name": fqn}},
     "mappings": {fqn: ["model", "layer", "weight"]},
     "rank_state": [0, 1]}

``file`` indexes ``files`` (the rank that wrote the chunk); ``name`` is the chunk's key in the
typed tree of that rank's file. ``rank_state`` lists the ranks whose file holds per-rank state
(RNG, data loader) written by :func:`torchkeep.distributed.save`.
"""

from __future__ import annotations

import json
import os
import posixpath
import re
import stat
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)

from .. import knobs
from ..errors import FormatError
from ..format.dtypes import dtype_from_name, dtype_name
from ..storage.paths import read_capped
from ..storage.urls import is_url, normalize, remote_backend_for
from .chunks import check_chunks

METADATA_FILE = "checkpoint.json"
SCHEMA_VERSION = 1
#: Largest metadata file read (a model with a million tensors stays well below this).
MAX_METADATA_BYTES = 1 << 30
MAX_WORLD_SIZE = 1 << 20
_FILE_RE = re.compile(r"^rank-[0-9]{5,7}\.safetensors$")
_PICKLE_MAGIC = (b"\x80", b"PK\x03\x04")  # pickle protocol 2+, torch.save zip archive


def target_path(path: str | os.PathLike) -> str:
    """A checkpoint's location: an absolute local path, or a normalized fsspec URL."""
    path = os.fspath(path)
    return normalize(path) if is_url(path) else os.path.abspath(path)


def join(directory: str, name: str) -> str:
    """``directory/name`` for local paths and URLs alike."""
    return posixpath.join(directory, name) if is_url(directory) else os.path.join(directory, name)


def rank_file(rank: int) -> str:
    """Name of the shard file written by ``rank``."""
    return f"rank-{rank:05d}.safetensors"


@dataclass(frozen=True)
class Stored:
    """Where one chunk or value lives: the index of its file and its name in that file's tree."""

    file: int
    name: str


@dataclass
class Parsed:
    """A validated ``checkpoint.json``: DCP's ``Metadata`` plus torchkeep's own facts."""

    metadata: Metadata
    files: list[str]
    world_size: int
    rank_state: list[int]
    doc: dict


# -- writing ---------------------------------------------------------------------------------
def encode(
    metadata: Metadata, stored: dict[MetadataIndex, Stored], world_size: int, rank_state: list[int]
) -> bytes:
    """The JSON bytes of ``checkpoint.json`` for a finished save."""
    tensors: dict[str, Any] = {}
    values: dict[str, Any] = {}
    for fqn, meta in metadata.state_dict_metadata.items():
        if isinstance(meta, BytesStorageMetadata):
            where = stored[MetadataIndex(fqn)]
            values[fqn] = {"file": where.file, "name": where.name}
            continue
        chunks = []
        for chunk in meta.chunks:
            where = stored[MetadataIndex(fqn, chunk.offsets)]
            chunks.append(
                {
                    "offsets": list(chunk.offsets),
                    "sizes": list(chunk.sizes),
                    "file": where.file,
                    "name": where.name,
                }
            )
        tensors[fqn] = {
            "dtype": dtype_name(meta.properties.dtype),
            "shape": list(meta.size),
            "chunks": chunks,
        }
    doc = {
        "torchkeep_dcp": SCHEMA_VERSION,
        "world_size": world_size,
        "dcp_version": metadata.version,
        "files": [rank_file(r) for r in range(world_size)],
        "tensors": tensors,
        "values": values,
        "mappings": _mappings_json(metadata.planner_data),
        "rank_state": sorted(rank_state),
    }
    return json.dumps(doc, separators=(",", ":"), allow_nan=False).encode("utf-8")


def _mappings_json(planner_data: Any) -> dict[str, list] | None:
    if not isinstance(planner_data, dict):
        return None
    return {fqn: list(path) for fqn, path in planner_data.items()}


# -- reading ---------------------------------------------------------------------------------
def read(directory: str, storage_options: dict | None = None) -> Parsed:
    """Read and validate ``directory/checkpoint.json``; every problem is a FormatError.

    ``directory`` may be an fsspec URL: the step counts only when its commit marker is valid
    (every listed object present with its size), which also stands for the shard-file checks.
    """
    if is_url(directory):
        path = posixpath.join(directory, METADATA_FILE)
        raw = _read_remote(path, directory, storage_options)
    else:
        path = os.path.join(directory, METADATA_FILE)
        raw = _read_bounded(path, directory)
    if raw.startswith(_PICKLE_MAGIC):
        raise FormatError(
            f"{path}: holds a pickle (or torch.save archive), not JSON; torchkeep never "
            "unpickles checkpoint metadata. Re-save the checkpoint with torchkeep."
        )
    try:
        doc = json.loads(raw.decode("utf-8"), parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError) as exc:
        raise FormatError(f"{path}: not valid JSON ({exc})") from exc
    try:
        return _parse(doc, directory)
    except (ValueError, TypeError, KeyError) as exc:
        raise FormatError(f"{path}: {exc}") from exc


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


def _read_remote(path: str, directory: str, storage_options: dict[str, Any] | None) -> bytes:
    store = remote_backend_for(directory, storage_options)
    try:
        entries = store.list(directory)
    except FileNotFoundError:
        entries = []
    if not entries or not store.committed(directory, entries):
        raise FormatError(f"{directory}: no committed torchkeep checkpoint (no valid marker)")
    size = next((e.size for e in entries if e.name == METADATA_FILE and e.kind == "file"), None)
    if size is None:
        raise FormatError(f"{path}: missing; not a torchkeep sharded checkpoint")
    if size > MAX_METADATA_BYTES:
        raise FormatError(f"{path}: larger than {MAX_METADATA_BYTES} bytes; refused")
    return store.read_range(path, 0, size)


def _read_bounded(path: str, directory: str) -> bytes:
    if not os.path.isdir(directory):
        raise FormatError(f"{directory}: not a directory (a torchkeep sharded checkpoint is one)")
    try:  # no symlink, no FIFO or device: a plain file or nothing
        return read_capped(path, MAX_METADATA_BYTES, "refused")
    except FileNotFoundError:
        stock = os.path.exists(os.path.join(directory, ".metadata"))
        hint = " (it looks like a stock DCP checkpoint; its .metadata is a pickle)" if stock else ""
        raise FormatError(f"{path}: missing; not a committed torchkeep checkpoint{hint}") from None
    except OSError as exc:
        raise FormatError(f"{path}: cannot open ({exc.strerror})") from exc


def _parse(doc: Any, directory: str) -> Parsed:
    if not isinstance(doc, dict) or doc.get("torchkeep_dcp") != SCHEMA_VERSION:
        raise ValueError(f"not torchkeep sharded-checkpoint metadata of version {SCHEMA_VERSION}")
    world = doc.get("world_size")
    if type(world) is not int or not 1 <= world <= MAX_WORLD_SIZE:
        raise ValueError(f"world_size {world!r} must be an int in 1..{MAX_WORLD_SIZE}")
    files = doc.get("files")
    if not isinstance(files, list) or len(files) != world:
        raise ValueError(f"files must list exactly world_size ({world}) shard files")
    for rank, name in enumerate(files):
        if name != rank_file(rank):
            raise ValueError(f"files[{rank}] is {name!r}; expected {rank_file(rank)!r}")
        _require_shard(directory, name)
    state: dict[str, Any] = {}
    stored: dict[MetadataIndex, Stored] = {}
    for fqn, spec in _dict(doc.get("tensors"), "tensors").items():
        state[fqn] = _tensor(fqn, spec, world, stored)
    for fqn, spec in _dict(doc.get("values"), "values").items():
        if fqn in state:
            raise ValueError(f"{fqn!r} is listed both as a tensor and as a value")
        stored[MetadataIndex(fqn)] = _stored(spec, world, f"values[{fqn!r}]")
        state[fqn] = BytesStorageMetadata()
    rank_state = doc.get("rank_state", [])
    if not (
        isinstance(rank_state, list) and all(type(r) is int and 0 <= r < world for r in rank_state)
    ):
        raise ValueError("rank_state must list ranks below world_size")
    version = doc.get("dcp_version")
    if version is not None and not isinstance(version, str):
        raise ValueError("dcp_version must be a string or null")
    metadata = Metadata(
        state_dict_metadata=state,
        planner_data=_mappings(doc.get("mappings")),
        storage_data=stored,
        version=version,
    )
    return Parsed(metadata, files, world, sorted(set(rank_state)), doc)


def _require_shard(directory: str, name: str) -> None:
    if is_url(directory):
        return  # the commit marker lists every object with its size (checked in read)
    if not _FILE_RE.match(name):
        raise ValueError(f"shard file name {name!r} is not allowed")
    path = os.path.join(directory, name)
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        raise ValueError(f"shard file {path} is missing; the checkpoint is incomplete") from None
    if not stat.S_ISREG(info.st_mode):
        raise ValueError(f"shard file {path} is not a regular file (symlinks are refused)")


def _dict(value: Any, what: str) -> dict:
    if not isinstance(value, dict):
        raise ValueError(f"{what} must be an object")
    return value


def _stored(spec: Any, world: int, what: str) -> Stored:
    if not isinstance(spec, dict):
        raise ValueError(f"{what} must be an object")
    file, name = spec.get("file"), spec.get("name")
    if type(file) is not int or not 0 <= file < world:
        raise ValueError(f"{what}: file {file!r} is not a rank below world_size {world}")
    if not isinstance(name, str) or not name:
        raise ValueError(f"{what}: name must be a non-empty string")
    return Stored(file, name)


def _tensor(fqn: str, spec: Any, world: int, stored: dict) -> TensorStorageMetadata:
    what = f"tensor {fqn!r}"
    spec = _dict(spec, what)
    try:
        dtype = dtype_from_name(spec.get("dtype"))
    except ValueError as exc:
        raise ValueError(f"{what}: {exc}") from None
    shape = _ints(spec.get("shape"), f"{what}: shape")
    raw_chunks = spec.get("chunks")
    if not isinstance(raw_chunks, list) or not raw_chunks:
        raise ValueError(f"{what}: chunks must be a non-empty list")
    chunks = []
    for i, c in enumerate(raw_chunks):
        c = _dict(c, f"{what}: chunk {i}")
        offsets = _ints(c.get("offsets"), f"{what}: chunk {i} offsets")
        sizes = _ints(c.get("sizes"), f"{what}: chunk {i} sizes")
        chunk = ChunkStorageMetadata(torch.Size(offsets), torch.Size(sizes))
        index = MetadataIndex(fqn, chunk.offsets)
        if index in stored:
            raise ValueError(f"{what}: two chunks start at offsets {offsets}")
        stored[index] = _stored(c, world, f"{what}: chunk {i}")
        chunks.append(chunk)
    check_chunks(fqn, shape, chunks)
    return TensorStorageMetadata(TensorProperties(dtype=dtype), torch.Size(shape), chunks)


def _ints(value: Any, what: str) -> list[int]:
    if not isinstance(value, list) or len(value) > knobs.MAX_RANK:
        raise ValueError(f"{what} must be a list of at most {knobs.MAX_RANK} ints")
    if not all(type(x) is int and 0 <= x < 2**62 for x in value):
        raise ValueError(f"{what} must hold non-negative ints, got {value!r}")
    return value


def _mappings(value: Any) -> dict[str, tuple] | None:
    if value is None:
        return None
    out = {}
    for fqn, path in _dict(value, "mappings").items():
        ok = isinstance(path, list) and 0 < len(path) <= knobs.MAX_TREE_DEPTH
        if not ok or not all(type(p) in (str, int) for p in path):
            raise ValueError(f"mappings[{fqn!r}] must be a list of keys (strings or ints)")
        out[fqn] = tuple(path)
    return out
