"""Forge amplification bombs and malformed-metadata files (issue 18, findings 6 and 8).

Each file is small but claims something huge: stride-0 views of one stored element, repeated
references to one entry, keys that all hash alike, long keys above many values, quantized or
``bits*`` dtypes, 2**70-sized ``torch.Size`` values, deep pickles, and DCP folders whose
metadata names huge sizes, escaping paths, symlinks, directories and out-of-range bytes.
"""

from __future__ import annotations

import io
import os
import pickle
import struct
import zipfile

import torch
from forge import torchkeep_file
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)

#: ``hash(k * P) == 0`` for every int k: Python reduces int hashes modulo this prime.
P = 2**61 - 1
F64 = {"t": ("F64", [1], b"\0" * 8)}
RAW = {"t": ("U8", [16], bytes(range(16)))}


def _tensor(key: str = "t", **extra: object) -> dict:
    return {"$": "tensor", "key": key, **extra}


def _expand(shape: list[int], **extra: object) -> dict:
    return _tensor(view={"shape": shape, "stride": [0] * len(shape), "offset": 0}, **extra)


def torchkeep_bombs(n_keys: int = 20_000) -> dict[str, bytes]:
    """torchkeep files, checksums valid, so the tree reaches the decoder."""
    wide = {"$": "dict", "v": {str(i): 0 for i in range(n_keys)}}
    return {
        # 2**32 float64 elements (32 GiB) from 8 stored bytes: under the element cap of
        # MAX_VIEW_ELEMENTS, refused by the expansion limit.
        "tk_expand_32gib": torchkeep_file(_expand([2**16, 2**16]), F64),
        "tk_expand_in_dict": torchkeep_file(
            {"$": "dict", "v": {f"w{i}": _expand([2**12, 2**12]) for i in range(64)}}, F64
        ),
        "tk_expand_dtype_override": torchkeep_file(
            _expand([2**30], dtype="complex128"), {"t": ("U8", [16], b"\0" * 16)}
        ),
        # One 64 KiB entry referenced 20,000 times: 1.3 GB of logical tensors in a 0.6 MB file.
        "tk_many_aliases": torchkeep_file(
            [_tensor() for _ in range(20_000)], {"t": ("U8", [65536], b"\0" * 65536)}
        ),
        "tk_dtype_qint8": torchkeep_file(_tensor(dtype="qint8"), RAW),
        "tk_dtype_quint4x2": torchkeep_file(_tensor(dtype="quint4x2"), RAW),
        "tk_dtype_bits8": torchkeep_file(_tensor(dtype="bits8"), RAW),
        "tk_dtype_bits16": torchkeep_file(_tensor(dtype="bits16"), RAW),
        "tk_dtype_view_qint32": torchkeep_file(
            _tensor(dtype="qint32", view={"shape": [2], "stride": [1], "offset": 0}), RAW
        ),
        "tk_size_2_70": torchkeep_file({"$": "dict", "v": {"s": {"$": "size", "v": [2**70]}}}, {}),
        "tk_size_2_63": torchkeep_file({"$": "size", "v": [1, 2**63]}, {}),
        "tk_flood_int_keys": torchkeep_file(_items([[k * P, 0] for k in range(1, n_keys)]), {}),
        "tk_flood_mixed_keys": torchkeep_file(
            _items([[k * P if k % 2 else {"$": "tuple", "v": [k * P]}, 0] for k in range(n_keys)]),
            {},
        ),
        "tk_flood_tuple_keys": torchkeep_file(
            _items([[{"$": "tuple", "v": [k * P, 1]}, 0] for k in range(1, n_keys)]), {}
        ),
        "tk_flood_set": torchkeep_file({"$": "set", "v": [k * P for k in range(1, n_keys)]}, {}),
        "tk_flood_frozenset": torchkeep_file(
            {"$": "frozenset", "v": [-k * P for k in range(1, n_keys)]}, {}
        ),
        "tk_duplicate_keys": torchkeep_file(_items([[7, i] for i in range(n_keys)]), {}),
        "tk_long_key_paths": torchkeep_file({"$": "dict", "v": {"A" * 200_000: wide}}, {}),
    }


def _items(pairs: list) -> dict:
    return {"$": "dict", "items": pairs}


def _save(obj: object, **kwargs: object) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer, **kwargs)
    return buffer.getvalue()


def torch_zip(pickle_bytes: bytes, storages: dict[str, bytes] | None = None) -> bytes:
    """A torch.save zip around hand-written pickle bytes (``storages``: key -> raw bytes)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("archive/data.pkl", pickle_bytes)
        archive.writestr("archive/byteorder", "little")
        archive.writestr("archive/version", "3\n")
        for key, raw in (storages or {}).items():
            archive.writestr(f"archive/data/{key}", raw)
    return buffer.getvalue()


def torch_bombs() -> dict[str, bytes]:
    """torch.save files: expanded views, aliases, long keys, deep nesting."""
    one = torch.zeros(1, dtype=torch.float64)
    block = torch.zeros(16384, dtype=torch.uint8)
    deep = b"\x80\x02" + b"]" * 200_000 + b"a" * 199_999 + b"."  # lists nested 200,000 deep
    return {
        "pt_expand_64gib": _save({"w": one.expand(2**33)}),
        "pt_expand_legacy": _save({"w": one.expand(2**33)}, _use_new_zipfile_serialization=False),
        "pt_expand_2d": _save([one.expand(2**20, 2**12)]),
        "pt_many_aliases": _save({f"a{i}": block for i in range(20_000)}),
        "pt_size_2_70": _save({"s": torch.Size([2**70])}),
        "pt_long_key_paths": _save({"A" * 200_000: {str(i): 0 for i in range(20_000)}}),
        "pt_deep_lists": torch_zip(deep),
        "pt_legacy_storage_numel": _legacy_numel(),
    }


def _legacy_numel() -> bytes:
    """A legacy torch.save file whose pickle claims a 2**31-element float64 storage (16 GiB)
    for 12,345 stored elements: pickles have no offsets, so the longer int just fits."""
    legacy = {"_use_new_zipfile_serialization": False}
    raw = _save({"w": torch.zeros(12345, dtype=torch.float64)}, **legacy)
    return raw.replace(b"M90", b"J\xff\xff\xff\x7f", 1)  # BININT2 12345 -> BININT 2**31-1


def _props(dtype: torch.dtype = torch.float32) -> TensorProperties:
    return TensorProperties(dtype=dtype)


def dcp_folder(
    folder: str,
    *,
    size: object = (2, 2),
    dtype: torch.dtype = torch.float32,
    chunk: tuple[object, object] = ((0, 0), (2, 2)),
    rel: object = "__0_0.distcp",
    offset: object = 0,
    length: object | None = None,
    planner: object = None,
    items: object = None,
    value: object = None,
) -> str:
    """A one-tensor DCP folder whose metadata fields can each be forged (``value``: a
    pickled value stored in place of the tensor)."""
    os.makedirs(folder, exist_ok=True)
    blob = _save(torch.ones(2, 2) if value is None else value)
    with open(os.path.join(folder, "__0_0.distcp"), "wb") as handle:
        handle.write(blob)
    chunks = [ChunkStorageMetadata(*chunk)]  # type: ignore[arg-type]
    tensor = TensorStorageMetadata(_props(dtype), size, chunks)  # type: ignore[arg-type]
    info = _StorageInfo(rel, offset, len(blob) if length is None else length)  # type: ignore
    meta = Metadata(
        state_dict_metadata={"w": tensor} if items is None else items,  # type: ignore[arg-type]
        storage_data={MetadataIndex("w", torch.Size([0, 0])): info},
        planner_data=planner,
    )
    with open(os.path.join(folder, ".metadata"), "wb") as handle:
        pickle.dump(meta, handle)
    return folder


def dcp_bombs(root: str) -> dict[str, str]:
    """Hostile DCP folders by name (paths)."""
    big = torch.Size([2**20, 2**20])
    cases = {
        "dcp_size_2_70": dict(size=torch.Size([2**70]), chunk=((0,), (2,))),
        "dcp_size_huge": dict(size=big, chunk=((0, 0), (2, 2))),
        "dcp_size_negative": dict(size=(2, -2)),
        "dcp_size_rank_1000": dict(size=(1,) * 1000, chunk=((0,) * 1000, (1,) * 1000)),
        "dcp_dtype_qint8": dict(dtype=torch.qint8),
        "dcp_dtype_bits16": dict(dtype=torch.bits16),
        "dcp_chunk_out_of_bounds": dict(chunk=((1, 1), (2, 2))),
        "dcp_chunk_wrong_rank": dict(chunk=((0,), (2,))),
        "dcp_path_dotdot": dict(rel=".."),
        "dcp_path_dot": dict(rel="."),
        "dcp_path_absolute": dict(rel="/etc/passwd"),
        "dcp_path_escape": dict(rel="../outside.distcp"),
        "dcp_path_not_str": dict(rel=7),
        "dcp_offset_negative": dict(offset=-5),
        "dcp_offset_huge": dict(offset=2**62),
        "dcp_length_huge": dict(length=2**40),
        "dcp_length_float": dict(length=1.5),
        "dcp_planner_unhashable": dict(planner={"w": ([1], "x")}),
        "dcp_items_not_dict": dict(items=[("w", 1)]),
        "dcp_value_expanded": dict(
            items={"w": BytesStorageMetadata()},
            value={"v": torch.zeros(1, dtype=torch.float64).expand(2**33)},
        ),
    }
    out = {name: dcp_folder(os.path.join(root, name), **kw) for name, kw in cases.items()}
    link = dcp_folder(os.path.join(root, "dcp_storage_symlink"), rel="link.distcp")
    outside = os.path.join(root, "outside.distcp")
    with open(outside, "wb") as handle:
        handle.write(struct.pack("<Q", 0) * 512)
    os.symlink(outside, os.path.join(link, "link.distcp"))
    out["dcp_storage_symlink"] = link
    sub = dcp_folder(os.path.join(root, "dcp_storage_dir"), rel="sub.distcp")
    os.mkdir(os.path.join(sub, "sub.distcp"))
    out["dcp_storage_dir"] = sub
    meta_dir = dcp_folder(os.path.join(root, "dcp_metadata_symlink"))
    os.replace(os.path.join(meta_dir, ".metadata"), os.path.join(root, "meta.outside"))
    os.symlink(os.path.join(root, "meta.outside"), os.path.join(meta_dir, ".metadata"))
    out["dcp_metadata_symlink"] = meta_dir
    return out
