"""Hostile and broken files: every malformation raises FormatError/CorruptionError, nothing else.

Files are crafted by hand. For cases that target torchkeep metadata (typed tree, checksum table,
views) the header checksum is recomputed, so the validation under test is actually reached.
"""

from __future__ import annotations

import functools
import json
import os
import random
import struct
import tempfile

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import torchkeep
from torchkeep import knobs
from torchkeep.errors import CorruptionError, FormatError
from torchkeep.format import checksum
from torchkeep.format import header as hdr
from torchkeep.transfer.reader import FileReader

LONG = os.environ.get("TORCHKEEP_LONG") == "1"

BAD = (FormatError, CorruptionError)


def raw_file(path, header_bytes: bytes, data: bytes = b"", length: int | None = None):
    n = len(header_bytes) if length is None else length
    path.write_bytes(struct.pack("<Q", n) + header_bytes + data)
    return path


def st_file(path, entries: dict, data: bytes, metadata: dict | None = None):
    body = dict(entries)
    if metadata is not None:
        body["__metadata__"] = metadata
    return raw_file(path, json.dumps(body).encode(), data)


def assert_rejected(path, *errors):
    """Both the lazy reader and ``torchkeep.load`` refuse the file with a torchkeep error."""
    errors = errors or BAD
    with pytest.raises(errors) as info:
        torchkeep.load(path)
    assert str(path) in str(info.value)
    with pytest.raises(errors), FileReader(path) as reader:
        reader.load()
    return info.value


F32_4 = {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}


# ------------------------------------------------------------------------- length prefix


@pytest.mark.parametrize("length", [0, 2**63, 2**64 - 1, 10_000, 100_000_001], ids=str)
def test_bad_header_length(tmp_path, length):
    path = raw_file(tmp_path / "f", b'{"__metadata__":{}}', b"\0" * 64, length=length)
    assert_rejected(path, FormatError)


def test_header_length_over_cap_with_large_enough_file(tmp_path, monkeypatch):
    body = json.dumps({"x": F32_4}).encode()
    path = raw_file(tmp_path / "f", body, b"\0" * 16)
    monkeypatch.setattr(knobs, "MAX_HEADER_BYTES", len(body) - 1)
    assert "cap" in str(assert_rejected(path, FormatError))


@pytest.mark.parametrize("size", [0, 1, 7, 8])
def test_too_short(tmp_path, size):
    path = tmp_path / "f"
    path.write_bytes(b"\x10" + b"\0" * (size - 1) if size else b"")
    with pytest.raises(FormatError):
        FileReader(path)


# ------------------------------------------------------------------------------ JSON level

JSON_CASES = {
    "invalid-utf8": b'{"a\xff\xfe":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}',
    "overlong-utf8": b'{"\xc0\xaf":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}',
    "truncated-json": b'{"x":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}',
    "not-json": b"{this is not json}",
    "trailing-garbage": b'{"x":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}} xx',
    "array": b"[1, 2, 3]",
    "nan-shape": b'{"x":{"dtype":"F32","shape":[NaN],"data_offsets":[0,16]}}',
    "infinity-offset": b'{"x":{"dtype":"F32","shape":[4],"data_offsets":[0,Infinity]}}',
    "duplicate-tensor": (
        b'{"x":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},'
        b'"x":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}'
    ),
    "duplicate-metadata": (
        b'{"__metadata__":{"a":"1","a":"2"},"x":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}'
    ),
    "duplicate-field": (b'{"x":{"dtype":"F32","dtype":"F32","shape":[4],"data_offsets":[0,16]}}'),
    "deep-nesting": b'{"x":' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    "deep-objects": b'{"x":' + b'{"a":' * 50_000 + b"1" + b"}" * 50_000 + b"}",
}


@pytest.mark.parametrize("case", list(JSON_CASES))
def test_malformed_json(tmp_path, case):
    path = raw_file(tmp_path / "f", JSON_CASES[case], b"\0" * 16)
    assert_rejected(path, FormatError)


# ---------------------------------------------------------------------------- entry level

ENTRY_CASES = {
    "unknown-dtype": ({"x": {**F32_4, "dtype": "F33"}}, 16),
    "lowercase-dtype": ({"x": {**F32_4, "dtype": "f32"}}, 16),
    "dtype-not-string": ({"x": {**F32_4, "dtype": 4}}, 16),
    "negative-shape": ({"x": {**F32_4, "shape": [-4]}}, 16),
    "negative-both": ({"x": {"dtype": "F32", "shape": [-2, -2], "data_offsets": [0, 16]}}, 16),
    "float-shape": ({"x": {**F32_4, "shape": [4.0]}}, 16),
    "string-shape": ({"x": {**F32_4, "shape": ["4"]}}, 16),
    "bool-shape": ({"x": {"dtype": "F32", "shape": [True, 4], "data_offsets": [0, 16]}}, 16),
    "null-shape": ({"x": {**F32_4, "shape": None}}, 16),
    "huge-rank": ({"x": {"dtype": "U8", "shape": [1] * 10_000, "data_offsets": [0, 1]}}, 1),
    "overflow": ({"x": {"dtype": "F32", "shape": [2**62, 4], "data_offsets": [0, 16]}}, 16),
    "overflow-many": ({"x": {"dtype": "F64", "shape": [2**31] * 3, "data_offsets": [0, 8]}}, 8),
    "overflow-wraps-to-match": (
        {"x": {"dtype": "U8", "shape": [2**32, 2**32, 16], "data_offsets": [0, 16]}},
        16,
    ),
    "zero-dim-hides-overflow": (
        {"x": {"dtype": "F32", "shape": [0, 2**63, 2**63], "data_offsets": [0, 0]}},
        0,
    ),
    "offsets-out-of-range": ({"x": {**F32_4, "data_offsets": [0, 1600]}}, 16),
    "offsets-reversed": ({"x": {**F32_4, "data_offsets": [16, 0]}}, 16),
    "offsets-negative": ({"x": {**F32_4, "data_offsets": [-16, 0]}}, 16),
    "offsets-float": ({"x": {**F32_4, "data_offsets": [0.0, 16.0]}}, 16),
    "offsets-three": ({"x": {**F32_4, "data_offsets": [0, 16, 32]}}, 16),
    "offsets-huge": ({"x": {**F32_4, "data_offsets": [2**64, 2**64 + 16]}}, 16),
    "length-mismatch": ({"x": {**F32_4, "data_offsets": [0, 12]}}, 12),
    "overlap": (
        {
            "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
            "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
        },
        12,
    ),
    "alias-same-range": ({"a": F32_4, "b": F32_4}, 16),
    "hole": (
        {
            "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
            "b": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]},
        },
        12,
    ),
    "leading-hole": ({"x": {**F32_4, "data_offsets": [4, 20]}}, 20),
    "trailing-bytes": ({"x": F32_4}, 17),
    "missing-data": ({"x": F32_4}, 15),
    "extra-field": ({"x": {**F32_4, "extra": 1}}, 16),
    "missing-field": ({"x": {"dtype": "F32", "shape": [4]}}, 16),
    "entry-not-object": ({"x": [1, 2]}, 16),
    "metadata-not-object": ({"__metadata__": [1], "x": F32_4}, 16),
    "metadata-non-string": ({"__metadata__": {"a": 1}, "x": F32_4}, 16),
    "metadata-nested": ({"__metadata__": {"a": {"b": "c"}}, "x": F32_4}, 16),
}


@pytest.mark.parametrize("case", list(ENTRY_CASES))
def test_malformed_entries(tmp_path, case):
    entries, data_size = ENTRY_CASES[case]
    path = raw_file(tmp_path / "f", json.dumps(entries).encode(), b"\1" * data_size)
    assert_rejected(path, FormatError)


def test_plain_safetensors_with_zero_size_tensor_is_fine(tmp_path):
    entries = {"e": {"dtype": "F32", "shape": [0, 5], "data_offsets": [0, 0]}, "x": F32_4}
    path = raw_file(tmp_path / "f", json.dumps(entries).encode(), b"\0" * 16)
    out = torchkeep.load(path)
    assert out["e"].shape == (0, 5) and torch.equal(out["x"], torch.zeros(4))


# ----------------------------------------------------------------- torchkeep metadata level


@functools.lru_cache(maxsize=1)
def _valid_blob() -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "good.tk")
        base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
        obj = {"w": base, "row": base[1], "step": 7, "c": torch.ones(2, dtype=torch.complex128)}
        torchkeep.save(obj, path)
        with open(path, "rb") as handle:
            return handle.read()


def _valid(tmp_path=None):
    """A real torchkeep file, parsed into (entries, metadata, data bytes); fresh copies."""
    blob = _valid_blob()
    (n,) = struct.unpack("<Q", blob[:8])
    body = json.loads(blob[8 : 8 + n])
    meta = body.pop("__metadata__")
    return body, meta, blob[8 + n :]


def forge(path, entries: dict, meta: dict, data: bytes, reseal: bool = True):
    """Write a torchkeep file with a recomputed (valid) header checksum."""
    meta = dict(meta)
    if reseal:
        meta[hdr.META_HEADER_SUM] = checksum.PLACEHOLDER
    body = json.dumps({"__metadata__": meta, **entries}).encode()
    if reseal:
        body = hdr.seal(struct.pack("<Q", len(body)) + body)[8:]
    return raw_file(path, body, data)


def _tree_edit(edit):
    def apply(entries, meta):
        tree = json.loads(meta[hdr.META_TREE])
        edit(tree)
        meta[hdr.META_TREE] = json.dumps(tree)

    return apply


def _set_meta(key, value):
    def apply(entries, meta):
        if value is None:
            meta.pop(key)
        else:
            meta[key] = value

    return apply


def _sums_edit(edit):
    def apply(entries, meta):
        sums = json.loads(meta[hdr.META_CHECKSUMS])
        edit(sums)
        meta[hdr.META_CHECKSUMS] = json.dumps(sums)

    return apply


def _nest(depth: int) -> str:
    return "[" * depth + "1" + "]" * depth


META_CASES = {
    "tree-missing-tensor": _tree_edit(lambda t: t["v"]["w"].update(key="nope")),
    "tree-key-not-string": _tree_edit(lambda t: t["v"]["w"].update(key=3)),
    "tree-unknown-tag": _tree_edit(lambda t: t["v"].update(step={"$": "pickle", "v": "x"})),
    "tree-missing-tag": _tree_edit(lambda t: t["v"].update(step={"v": 1})),
    "tree-bad-float": _tree_edit(lambda t: t["v"].update(step={"$": "float", "v": "1e999"})),
    "tree-bare-nan": lambda e, m: m.update({hdr.META_TREE: '{"$":"dict","v":{"a":NaN}}'}),
    "tree-invalid-json": _set_meta(hdr.META_TREE, "{not json"),
    "tree-missing": _set_meta(hdr.META_TREE, None),
    "tree-duplicate-keys": _set_meta(hdr.META_TREE, '{"$":"dict","v":{"a":1,"a":2}}'),
    "tree-absurd-nesting": lambda e, m: m.update({hdr.META_TREE: _nest(5000)}),
    "tree-json-recursion": lambda e, m: m.update({hdr.META_TREE: _nest(200_000)}),
    "tree-bad-size": _tree_edit(lambda t: t["v"].update(step={"$": "size", "v": [-1]})),
    "tree-bad-np-dtype": _tree_edit(
        lambda t: t["v"].update(step={"$": "np_scalar", "dtype": "|O", "v": "00"})
    ),
    "tree-unhashable-key": _tree_edit(
        lambda t: t["v"].update(step={"$": "dict", "items": [[[1], 2]]})
    ),
    "tree-bad-device": _tree_edit(lambda t: t["v"].update(step={"$": "device", "v": "warp:9"})),
    "tree-bad-dtype-name": _tree_edit(lambda t: t["v"].update(step={"$": "dtype", "v": "os"})),
    "view-out-of-bounds": _tree_edit(lambda t: t["v"]["row"]["view"].update(offset=100)),
    "view-stride-out-of-bounds": _tree_edit(lambda t: t["v"]["row"]["view"].update(stride=[50])),
    "view-overflow": _tree_edit(
        lambda t: t["v"]["row"]["view"].update(shape=[2**40, 2**40], stride=[1, 1])
    ),
    "view-negative": _tree_edit(lambda t: t["v"]["row"]["view"].update(stride=[-1])),
    "view-rank-mismatch": _tree_edit(lambda t: t["v"]["row"]["view"].update(stride=[1, 1])),
    "view-not-object": _tree_edit(lambda t: t["v"]["row"].update(view=[1, 2])),
    "dtype-override-on-f32": _tree_edit(lambda t: t["v"]["w"].update(dtype="float64")),
    "raw-shape-mismatch": _tree_edit(lambda t: t["v"]["c"].update(shape=[3])),
    "raw-dtype-not-a-dtype": _tree_edit(lambda t: t["v"]["c"].update(dtype="Tensor")),
    "version-unknown": _set_meta(hdr.META_VERSION, "99"),
    "version-missing": _set_meta(hdr.META_VERSION, None),
    "checksums-missing": _set_meta(hdr.META_CHECKSUMS, None),
    "checksums-not-json": _set_meta(hdr.META_CHECKSUMS, "]["),
    "checksums-wrong-algorithm": _sums_edit(lambda s: s.update(algorithm="md5")),
    "checksums-missing-tensor": _sums_edit(lambda s: s["tensors"].pop("w")),
    "checksums-extra-tensor": _sums_edit(lambda s: s["tensors"].update(ghost="0" * 16)),
    "checksums-not-string": _sums_edit(lambda s: s["tensors"].update(w=5)),
}


@pytest.mark.parametrize("case", list(META_CASES))
def test_malformed_torchkeep_metadata(tmp_path, case):
    entries, meta, data = _valid(tmp_path)
    META_CASES[case](entries, meta)
    path = forge(tmp_path / "bad.tk", entries, meta, data)
    assert_rejected(path, FormatError)


def test_forge_helper_makes_loadable_files(tmp_path):
    entries, meta, data = _valid(tmp_path)
    path = forge(tmp_path / "same.tk", entries, meta, data)
    out = torchkeep.load(path)
    assert out["step"] == 7 and torch.equal(out["row"], out["w"][1])


def test_header_checksum_mismatch_is_corruption(tmp_path):
    entries, meta, data = _valid(tmp_path)
    meta[hdr.META_TREE] = meta[hdr.META_TREE].replace('"step":7', '"step":8')
    path = forge(tmp_path / "bad.tk", entries, meta, data, reseal=False)
    assert "header checksum" in str(assert_rejected(path, CorruptionError))


def test_header_checksum_covers_entries(tmp_path):
    entries, meta, data = _valid(tmp_path)
    entries["w"]["shape"] = [4, 3]  # still consistent for safetensors, not for torchkeep
    path = forge(tmp_path / "bad.tk", entries, meta, data, reseal=False)
    assert_rejected(path, CorruptionError)


def test_header_checksum_key_hidden_behind_an_escape_is_corruption(tmp_path):
    """A header whose checksum key is spelled with a JSON escape parses to the same metadata,
    but the stored bytes hold no checksum field: version 2 refuses it."""
    entries, meta, data = _valid(tmp_path)
    path = forge(tmp_path / "ok.tk", entries, meta, data)
    blob = path.read_bytes()
    hidden = blob.replace(b'"torchkeep.header_checksum"', b'"torchkeep\\u002eheader_checksum"', 1)
    assert hidden != blob
    (n,) = struct.unpack("<Q", blob[:8])
    body = hidden[8 : 8 + n + len(hidden) - len(blob)]
    raw_file(tmp_path / "bad.tk", body, hidden[8 + len(body) :])
    assert "header checksum" in str(assert_rejected(tmp_path / "bad.tk", CorruptionError))


def test_header_checksum_covers_padding(tmp_path):
    """Version 2 hashes the stored header bytes, padding included."""
    path, blob = _saved(tmp_path)
    (n,) = struct.unpack("<Q", blob[:8])
    assert blob[8 + n - 1 : 8 + n] == b" "  # the default 64-byte alignment pads this header
    padded = blob[: 8 + n - 1] + b"\n" + blob[8 + n :]  # still valid JSON whitespace
    (tmp_path / "bad.tk").write_bytes(padded)
    assert_rejected(tmp_path / "bad.tk", CorruptionError)


# ------------------------------------------------------------------------ truncation, bits


def _saved(tmp_path):
    path = tmp_path / "ok.tk"
    torchkeep.save({"a": torch.randn(64), "b": [torch.arange(10), 3.5], "c": "text"}, path)
    return path, path.read_bytes()


def test_truncated_at_every_point(tmp_path):
    path, blob = _saved(tmp_path)
    cut = tmp_path / "cut.tk"
    for size in range(len(blob)):
        cut.write_bytes(blob[:size])
        with pytest.raises(BAD):
            torchkeep.load(cut)


def test_every_bit_flip_is_caught(tmp_path, long_run):
    path, blob = _saved(tmp_path)
    bad = tmp_path / "flip.tk"
    positions = range(len(blob) * 8)
    if not long_run:
        rng = random.Random(0)
        positions = sorted(set(range(64)) | set(rng.sample(positions, 600)))
    for bit in positions:
        mutated = bytearray(blob)
        mutated[bit // 8] ^= 1 << (bit % 8)
        bad.write_bytes(mutated)
        with pytest.raises(torchkeep.TorchkeepError):
            torchkeep.load(bad)


def test_random_bytes(tmp_path, long_run):
    rng = random.Random(1)
    path = tmp_path / "rand"
    for trial in range(2000 if long_run else 200):
        size = rng.choice([0, 1, 8, 9, 64, 300, 5000])
        blob = bytearray(rng.randbytes(size))
        if trial % 3 == 0 and size >= 9:  # plausible length prefix and '{' to reach the parser
            blob[:8] = struct.pack("<Q", rng.randint(1, size))
            blob[8] = ord("{")
        path.write_bytes(bytes(blob))
        with pytest.raises(torchkeep.TorchkeepError):
            torchkeep.load(path)


def test_random_header_mutations_never_escape(tmp_path, long_run):
    """Mutated JSON headers either load or raise a torchkeep error; never another exception."""
    entries, meta, data = _valid(tmp_path)
    text = json.dumps({"__metadata__": meta, **entries})
    rng = random.Random(2)
    path = tmp_path / "mut.tk"
    for _ in range(1000 if long_run else 150):
        chars = list(text)
        for _ in range(rng.randint(1, 4)):
            chars[rng.randrange(len(chars))] = rng.choice('0123456789-[]{}",:.eE ')
        raw_file(path, "".join(chars).encode(), data)
        try:
            torchkeep.load(path)
        except torchkeep.TorchkeepError:
            pass


# ------------------------------------------------------------------------- verified loads


def _flip_in_tensor(tmp_path, key):
    path = tmp_path / "v.tk"
    obj = {"a": torch.arange(100, dtype=torch.float32), "b": {"c": torch.ones(50)}}
    torchkeep.save(obj, path)
    with FileReader(path) as reader:
        at = reader.header.data_start + reader.entry(key).begin + 13
    blob = bytearray(path.read_bytes())
    blob[at] ^= 0x04
    path.write_bytes(bytes(blob))
    return path, obj


@pytest.mark.parametrize("mmap", [False, True], ids=["read", "mmap"])
@pytest.mark.parametrize("key", ["a", "b.c"])
def test_flipped_data_bit_names_file_and_tensor(tmp_path, key, mmap):
    path, obj = _flip_in_tensor(tmp_path, key)
    with pytest.raises(CorruptionError) as info:
        torchkeep.load(path, mmap=mmap)
    assert str(path) in str(info.value) and repr(key) in str(info.value)
    out = torchkeep.load(path, verify=False, mmap=mmap)  # explicitly unverified: loads
    other = "b.c" if key == "a" else "a"
    flat = {"a": out["a"], "b.c": out["b"]["c"]}
    assert not torch.equal(flat[key], {"a": obj["a"], "b.c": obj["b"]["c"]}[key])
    assert torch.equal(flat[other], {"a": obj["a"], "b.c": obj["b"]["c"]}[other])
    assert torchkeep.verify(path) == [key]


def test_flipped_tree_bit_is_caught(tmp_path):
    path = tmp_path / "t.tk"
    torchkeep.save({"epoch": 12, "w": torch.ones(2)}, path)
    blob = path.read_bytes()
    at = blob.index(b'\\"epoch\\":12') + len(b'\\"epoch\\":1')
    bad = blob[:at] + b"3" + blob[at + 1 :]  # 12 -> 13: still valid JSON, still a valid tree
    path.write_bytes(bad)
    with pytest.raises(CorruptionError, match="header checksum"):
        torchkeep.load(path)
    with pytest.raises(CorruptionError):
        torchkeep.load(path, verify=False)  # the header is always checked: it is small


@pytest.mark.parametrize(
    "shape", [[0, 2**62, 2**62], [0, 2**61, 8], [2**40, 0, 2**40]], ids=["a", "b", "c"]
)
@pytest.mark.parametrize("mmap", [False, True], ids=["read", "mmap"])
def test_zero_size_does_not_hide_overflowing_dims(tmp_path, shape, mmap):
    entries = {"x": {"dtype": "F32", "shape": shape, "data_offsets": [0, 0]}}
    path = raw_file(tmp_path / "f", json.dumps(entries).encode())
    with pytest.raises(FormatError, match="overflows"):
        torchkeep.load(path, mmap=mmap)


# ---------------------------------------------------------------- fuzzing the typed tree


_TAGS = [
    "dict",
    "tuple",
    "set",
    "frozenset",
    "float",
    "size",
    "np_scalar",
    "bytes",
    "bytearray",
    "complex",
    "slice",
    "dtype",
    "device",
    "tensor",
    "ndarray",
    "nope",
]
_FIELDS = [
    "v",
    "items",
    "key",
    "dtype",
    "shape",
    "view",
    "offset",
    "stride",
    "np_dtype",
    "ordered",
    "meta",
    "param",
    "requires_grad",
    "device",
]
_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from(
        [
            "w",
            "row",
            "c",
            "inf",
            "-nan",
            "float32",
            "complex128",
            "cpu",
            "<f4",
            "|O",
            "00",
            "AAEC",
            "cuda:0",
            "meta",
            "",
            "os.system",
        ]
    ),  # fmt: skip
)
_json = st.recursive(
    _scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.sampled_from(_FIELDS + ["$"]), inner, max_size=4),
        st.builds(
            lambda tag, fields: {"$": tag, **fields},
            st.sampled_from(_TAGS),
            st.dictionaries(st.sampled_from(_FIELDS), inner, max_size=4),
        ),
    ),
    max_leaves=16,
)


@settings(
    max_examples=1500 if LONG else 150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(node=_json)
def test_fuzzed_tree_loads_or_raises_format_error(tmp_path, node):
    entries, meta, data = _valid(tmp_path)
    meta[hdr.META_TREE] = json.dumps(
        {"$": "dict", "v": {"w": {"$": "tensor", "key": "w"}, "x": node}}
    )
    path = forge(tmp_path / "fuzz.tk", entries, meta, data)
    for mmap in (False, True):
        try:
            torchkeep.load(path, mmap=mmap)
        except torchkeep.TorchkeepError:
            pass


def test_cuda_saved_tensor_needs_map_location_on_cpu_host(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this host has CUDA")
    entries, meta, data = _valid()
    tree = json.loads(meta[hdr.META_TREE])
    tree["v"]["w"]["device"] = "cuda:0"
    meta[hdr.META_TREE] = json.dumps(tree)
    path = forge(tmp_path / "cuda.tk", entries, meta, data)
    with pytest.raises(torchkeep.TorchkeepError, match="map_location"):
        torchkeep.load(path)
    for where in ("cpu", {"cuda:0": "cpu"}):
        out = torchkeep.load(path, map_location=where)
        assert out["w"].device.type == "cpu" and out["step"] == 7
    with pytest.raises(torchkeep.TorchkeepError):
        torchkeep.load(path, map_location={"cuda:0": "cuda:1"})
