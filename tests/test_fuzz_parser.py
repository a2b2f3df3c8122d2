"""Issue 5 fuzzing in ``make test``: hypothesis drives the header parser and the typed-tree
decoder with random bytes, mutated real files, random JSON headers, and random typed trees in
files whose checksums are valid (so the tree reaches the decoder). The only allowed outcomes
are a successful load or a TorchkeepError; anything else is a bug (the campaign in
tests/fuzz_campaign.py keeps what it finds in tests/hostile/corpus/).
"""

from __future__ import annotations

import json
import os
import sys
from collections import OrderedDict

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import torchkeep

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "hostile"))
from forge import raw_file, torchkeep_file  # noqa: E402

LONG = os.environ.get("TORCHKEEP_LONG") == "1"
EXAMPLES = 2000 if LONG else 120
SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

DTYPES = ["F32", "F16", "BF16", "F64", "I64", "I32", "U8", "BOOL", "F8_E4M3", "X9", 3, None]
TAGS = ["dict", "tuple", "set", "frozenset", "float", "size", "np_scalar", "bytes", "bytearray",
        "complex", "slice", "dtype", "device", "tensor", "ndarray", "nope", 7]  # fmt: skip
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=12),
)
JSON = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=20,
)
NODE = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.fixed_dictionaries(
            {"$": st.sampled_from(TAGS)},
            optional={
                "v": st.one_of(inner, st.lists(inner, max_size=3), st.dictionaries(
                    st.text(max_size=4), inner, max_size=3)),
                "key": st.sampled_from(["t", "u", "nope", 1]),
                "shape": st.lists(st.integers(-2, 2**40), max_size=4),
                "dtype": st.sampled_from(["float32", "uint8", "int64", "bogus", 1]),
                "np_dtype": st.sampled_from(["<f4", "|O", "V8", "<c8", "x"]),
                "device": st.sampled_from(["cpu", "cuda:0", "meta", "", 3]),
                "view": st.fixed_dictionaries({
                    "shape": st.lists(st.integers(-1, 2**33), max_size=3),
                    "stride": st.lists(st.integers(-1, 2**33), max_size=3),
                    "offset": st.integers(-1, 10),
                }),
                "param": st.booleans(),
                "requires_grad": st.booleans(),
                "ordered": st.booleans(),
            },
        ),
    ),
    max_leaves=12,
)  # fmt: skip
TENSORS = {"t": ("F32", [4], bytes(range(16))), "u": ("U8", [3], b"abc")}


#: Every type a successful load may hand back (the typed tree's fixed constructors); anything
#: else came out of a file and would mean the file chose what to build.
PLAIN = (type(None), bool, int, float, str, bytes, bytearray, complex, slice)
PLAIN += (torch.dtype, torch.device, torch.Tensor)
CONTAINERS = (dict, list, tuple, set, frozenset)


def _assert_plain(value: object, path: str, depth: int = 0) -> None:
    """Assert that ``value`` holds only the plain types a load may build (no object of a type
    the file named, no object-dtype array), checking containers recursively."""
    assert depth < 200, f"{path}: nesting deeper than any decoder limit"
    if isinstance(value, (np.ndarray, np.generic)):
        assert not value.dtype.hasobject, f"{path}: object-dtype NumPy value"
        return
    if isinstance(value, PLAIN):
        return
    assert type(value) in CONTAINERS or type(value) in (OrderedDict, torch.Size), (
        f"{path}: a load returned a {type(value).__module__}.{type(value).__qualname__}"
    )
    items = value.items() if isinstance(value, dict) else enumerate(value)
    for key, item in items:
        if isinstance(value, dict):
            _assert_plain(key, f"{path} key {key!r}", depth + 1)
        _assert_plain(item, f"{path}[{key!r}]", depth + 1)


def _exercise(path: str) -> None:
    """Every read path a file can take; only TorchkeepError may escape."""
    try:
        out = torchkeep.load(path)
        _assert_plain(out, "<root>")
        with torchkeep.open_file(path) as reader:
            for key in reader.keys():  # noqa: SIM118 - FileReader is not iterable
                reader.read_entry(key)
        torchkeep.verify(path)
        torchkeep.load_state_dict(torch.nn.Linear(2, 2), path, strict=False)
    except torchkeep.TorchkeepError:
        pass


def _check(tmp_path, blob: bytes) -> None:
    path = os.path.join(tmp_path, "fuzz.tk")
    with open(path, "wb") as handle:
        handle.write(blob)
    _exercise(path)


@pytest.fixture(scope="module")
def good_blob(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    path = tmp_path_factory.mktemp("fuzz") / "good.tk"
    torchkeep.save({"weight": torch.randn(3, 2), "step": 4, "names": ("a", b"b", 1.5)}, path)
    return path.read_bytes()


@SETTINGS
@given(blob=st.binary(max_size=600))
def test_random_bytes(tmp_path, blob: bytes) -> None:
    _check(tmp_path, blob)


@SETTINGS
@given(data=st.data())
def test_mutated_real_file(tmp_path, good_blob: bytes, data: st.DataObject) -> None:
    blob = bytearray(good_blob)
    for _ in range(data.draw(st.integers(1, 6))):
        at = data.draw(st.integers(0, len(blob) - 1))
        op = data.draw(st.sampled_from(["flip", "set", "cut", "insert"]))
        if op == "flip":
            blob[at] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "set":
            blob[at] = data.draw(st.integers(0, 255))
        elif op == "cut":
            del blob[at : at + data.draw(st.integers(1, 64))]
        else:
            blob[at:at] = data.draw(st.binary(min_size=1, max_size=16))
        if not blob:
            break
    _check(tmp_path, bytes(blob))


ENTRY = st.fixed_dictionaries(
    {
        "dtype": st.sampled_from(DTYPES),
        "shape": st.one_of(st.lists(st.integers(-3, 2**64), max_size=5), JSON),
        "data_offsets": st.one_of(st.lists(st.integers(-5, 64), max_size=3), JSON),
    }
)


@SETTINGS
@given(
    entries=st.dictionaries(st.text(max_size=8), st.one_of(ENTRY, JSON), max_size=4),
    meta=st.one_of(st.none(), JSON, st.dictionaries(st.text(max_size=8), JSON, max_size=3)),
    data=st.binary(max_size=64),
)
def test_random_json_header(tmp_path, entries: dict, meta: object, data: bytes) -> None:
    body = dict(entries)
    if meta is not None:
        body["__metadata__"] = meta
    _check(tmp_path, raw_file(json.dumps(body).encode(), data))


@SETTINGS
@given(tree=NODE)
def test_random_typed_tree_with_valid_checksums(tmp_path, tree: object) -> None:
    _check(tmp_path, torchkeep_file(tree, TENSORS))


@pytest.mark.parametrize(
    "tree",
    [
        # found by the long run: a tensor node at the root whose "v" field holds another node;
        # load_state_dict took the node's JSON fields for a state dict (KeyError: 'key')
        {"$": "tensor", "key": "t", "v": {"$": "tensor"}},
        {"$": "dict", "v": {"weight": {"$": "tensor", "key": "t", "view": {"stride": [1]}}}},
        {"$": "dict", "v": {"weight": {"$": "tensor", "key": "t", "view": 3}}},
        {"$": "dict", "v": {"weight": {"$": "tensor", "key": "t", "shape": "4"}}},
        {"$": "dict", "v": {"weight": {"$": "tensor", "key": "t", "shape": [-4]}}},
        {"$": "dict", "v": {"weight": {"$": "tensor", "key": "u", "dtype": "bogus"}}},
    ],
)
def test_forged_tensor_nodes_fail_load_state_dict_with_a_format_error(tmp_path, tree) -> None:
    path = os.path.join(tmp_path, "forged.tk")
    with open(path, "wb") as handle:
        handle.write(torchkeep_file(tree, TENSORS))
    with pytest.raises(torchkeep.TorchkeepError, match="forged.tk"):
        torchkeep.load_state_dict(torch.nn.Linear(2, 2), path, strict=False)


def test_plain_check_accepts_every_decoded_type_and_rejects_others(tmp_path) -> None:
    """The fuzz assertion bites: what a load of a saved tree returns passes it, while a type
    the decoder never builds, or an object-dtype array, fails it wherever it sits."""
    tree = {
        "t": torch.ones(2),
        "a": np.arange(3),
        "s": np.float32(1.5),
        "misc": [None, True, 3, 2.5, "x", b"y", bytearray(b"z"), 1j, slice(1, 2, None)],
        "torch": (torch.float16, torch.device("cpu"), torch.Size([2, 3])),
        "sets": ({1, 2}, frozenset({"a"})),
        "od": OrderedDict(k=1),
    }
    path = os.path.join(tmp_path, "all.tk")
    torchkeep.save(tree, path)
    _assert_plain(torchkeep.load(path), "<root>")

    class Foreign:
        pass

    for bad in ({"k": [Foreign()]}, {(1, Foreign()): 1}, [np.array([None], dtype=object)]):
        with pytest.raises(AssertionError):
            _assert_plain(bad, "<root>")
