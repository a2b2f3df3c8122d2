"""Forge hostile torchkeep/safetensors files, with valid checksums where the attack needs them.

A forged torchkeep file carries a correct header checksum and tensor checksums, so its
malformed typed tree or view reaches the decoder instead of being stopped by the checksum.
"""

from __future__ import annotations

import json
import struct

from torchkeep.format import checksum, header


def raw_file(header_bytes: bytes, data: bytes = b"", length: int | None = None) -> bytes:
    """Length prefix (``length`` or the true one) + header bytes + data."""
    size = len(header_bytes) if length is None else length
    return struct.pack("<Q", size) + header_bytes + data


def safetensors(entries: dict, data: bytes, metadata: dict | None = None) -> bytes:
    body = dict(entries)
    if metadata is not None:
        body = {"__metadata__": metadata, **body}
    return raw_file(json.dumps(body).encode(), data)


def torchkeep_file(tree: object, tensors: dict[str, tuple[str, list[int], bytes]]) -> bytes:
    """A torchkeep file whose typed tree is ``tree`` (any JSON), checksums all valid."""
    entries, blobs, sums, offset = {}, [], {}, 0
    for key, (dtype, shape, blob) in tensors.items():
        entries[key] = {
            "dtype": dtype,
            "shape": shape,
            "data_offsets": [offset, offset + len(blob)],
        }
        sums[key] = checksum.digest(blob)
        blobs.append(blob)
        offset += len(blob)
    tree_text = tree if isinstance(tree, str) else json.dumps(tree)
    meta = {
        header.META_FORMAT: "pt",
        header.META_VERSION: header.FORMAT_VERSION,
        header.META_TREE: tree_text,
        header.META_CHECKSUMS: json.dumps({"algorithm": checksum.ALGORITHM, "tensors": sums}),
    }
    meta[header.META_HEADER_SUM] = checksum.PLACEHOLDER
    return header.seal(header.encode_header(entries, meta)) + b"".join(blobs)


def _tensor(key: str, **extra: object) -> dict:
    return {"$": "tensor", "key": key, **extra}


ONE_F32 = {"t": ("F32", [4], b"\0" * 16)}


def hostile_files() -> dict[str, bytes]:
    """The issue-5 header and tree attacks that stress memory and time, by name."""
    deep_json = b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    digits = "7" * 5000
    deep_tree = '{"$":"tuple","v":' * 50_000 + "[]" + "}" * 50_000
    return {
        "length_2_63": raw_file(b"{}", length=2**63),
        "length_past_end": raw_file(b"{}", length=1 << 20),
        "nested_brackets_100k": raw_file(deep_json),
        "int_5000_digits": raw_file(
            f'{{"t":{{"dtype":"F32","shape":[{digits}],"data_offsets":[0,4]}}}}'.encode(),
            b"\0" * 4,
        ),
        "shape_overflow": safetensors(
            {
                "t": {
                    "dtype": "F32",
                    "shape": [4194305, 4194305, 211106198978564],
                    "data_offsets": [0, 16],
                }
            },
            b"\0" * 16,
        ),
        "huge_rank": safetensors(
            {"t": {"dtype": "U8", "shape": [1] * 1_000_000, "data_offsets": [0, 1]}}, b"\0"
        ),
        "zero_dim_huge_others": safetensors(
            {"t": {"dtype": "F64", "shape": [0, 2**62, 2**62], "data_offsets": [0, 0]}}, b""
        ),
        "tree_nested_50k": torchkeep_file(deep_tree, ONE_F32),
        "tree_missing_tensor": torchkeep_file(_tensor("nope"), ONE_F32),
        "tree_view_out_of_range": torchkeep_file(
            _tensor("t", view={"shape": [5], "stride": [1], "offset": 0}), ONE_F32
        ),
        "tree_view_2_62_elements": torchkeep_file(
            _tensor("t", view={"shape": [2**31, 2**31], "stride": [0, 0], "offset": 0}), ONE_F32
        ),
        "tree_shape_huge": torchkeep_file(_tensor("t", shape=[2**40, 2**40]), ONE_F32),
        "tree_object_ndarray": torchkeep_file(
            {"$": "ndarray", "key": "t", "np_dtype": "|O"}, ONE_F32
        ),
        "tree_dtype_override": torchkeep_file(_tensor("t", dtype="float64"), ONE_F32),
        "tree_huge_size_node": torchkeep_file({"$": "size", "v": [2**62] * 10_000}, ONE_F32),
        "tree_complex_huge_ints": torchkeep_file({"$": "complex", "v": [10**300, 10**300]}, {}),
        "tree_device_bogus": torchkeep_file(_tensor("t", device="cuda:99999"), ONE_F32),
        "tree_bytes_not_hex": torchkeep_file({"$": "bytes", "v": "zz" * 1000}, {}),
    }
