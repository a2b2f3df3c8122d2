"""Issue 18 finding 6: hash flooding through pickles (torch.save files, DCP metadata and items).

torch's weights-only unpickler builds dicts and sets itself, and keys that all hash alike make
that quadratic (``hash(k * (2**61 - 1)) == 0`` for every int k). The pickle scan counts, per
simulated container, the keys that share a hash and refuses more than
``knobs.MAX_HASH_COLLISIONS`` before torch's unpickler runs. The pickles here are written by
hand: pickling such a dict would itself take quadratic time.
"""

from __future__ import annotations

import io
import os
import pickle
import struct
import time
from collections import OrderedDict

import pytest
import torch
from bombs import dcp_folder, torch_zip
from click.testing import CliRunner

import torchkeep
from torchkeep import knobs
from torchkeep.cli.main import cli
from torchkeep.errors import UnsafeFileError
from torchkeep.readers.pickle_scan import scan_bytes

P61 = 2**61 - 1
FLOOD = "hash flooding"


def _int(n: int) -> bytes:
    raw = pickle.encode_long(n)
    return pickle.LONG1 + bytes([len(raw)]) + raw


def _colliding(n: int, at: int = 0) -> list[bytes]:
    """``n`` distinct int keys that all hash to ``at``."""
    return [_int(at + k * P61) for k in range(1, n + 1)]


def _head(proto: int) -> bytes:
    return pickle.PROTO + bytes([proto])


def _dict(keys: list[bytes]) -> bytes:
    return pickle.EMPTY_DICT + pickle.MARK + b"".join(k + b"K\x00" for k in keys) + pickle.SETITEMS


def _pickles(n: int) -> dict[str, bytes]:
    """Colliding containers of ``n`` keys in every shape a pickle can build one."""
    keys = _colliding(n)
    mark, stop = pickle.MARK, pickle.STOP
    pairs = b"".join(k + b"K\x00" + pickle.TUPLE2 for k in keys)
    return {
        "dict_p2": _head(2) + _dict(keys) + stop,
        "dict_p4": _head(4) + _dict(keys) + stop,
        "dict_p5_batches": _head(5)
        + pickle.EMPTY_DICT
        + b"".join(
            mark + b"".join(k + b"N" for k in keys[i : i + 1000]) + pickle.SETITEMS
            for i in range(0, n, 1000)
        )
        + stop,  # fmt: skip
        "dict_opcode": _head(2) + mark + b"".join(k + b"N" for k in keys) + pickle.DICT + stop,
        "set": _head(4) + pickle.EMPTY_SET + mark + b"".join(keys) + pickle.ADDITEMS + stop,
        "frozenset": _head(4) + mark + b"".join(keys) + pickle.FROZENSET + stop,
        "set_p2_reduce": _head(2)
        + b"c__builtin__\nset\n"
        + pickle.EMPTY_LIST
        + mark
        + b"".join(keys)
        + pickle.APPENDS
        + pickle.TUPLE1
        + pickle.REDUCE
        + stop,  # fmt: skip
        "tuple_keys": _head(4)
        + pickle.EMPTY_DICT
        + mark
        + b"".join(k + b"K\x01" + pickle.TUPLE2 + b"N" for k in keys)
        + pickle.SETITEMS
        + stop,
        "ordereddict": _head(2)
        + b"ccollections\nOrderedDict\n"
        + pickle.EMPTY_TUPLE
        + pickle.REDUCE
        + mark
        + b"".join(k + b"N" for k in keys)
        + pickle.SETITEMS
        + stop,
        "ordereddict_pairs": _head(2)
        + b"ccollections\nOrderedDict\n"
        + pickle.EMPTY_LIST
        + mark
        + pairs
        + pickle.APPENDS
        + pickle.TUPLE1
        + pickle.REDUCE
        + stop,  # fmt: skip
        "nested_in_lists": _head(4)
        + pickle.EMPTY_LIST
        + pickle.EMPTY_LIST
        + _dict(keys)
        + pickle.APPEND
        + pickle.APPEND
        + stop,  # fmt: skip
        "optimizer_state": _head(2)
        + pickle.EMPTY_DICT
        + b"X\x05\x00\x00\x00state"
        + pickle.EMPTY_DICT
        + mark
        + b"".join(
            k + pickle.EMPTY_DICT + b"X\x04\x00\x00\x00stepK\x00" + pickle.SETITEM for k in keys
        )
        + pickle.SETITEMS
        + pickle.SETITEM
        + stop,  # fmt: skip
    }


@pytest.mark.parametrize("name", sorted(_pickles(200)))
def test_every_container_shape_is_refused(name: str) -> None:
    raw = _pickles(200)[name]
    result = scan_bytes(torch_zip(raw), "f.pt")
    assert any(FLOOD in p and "200 keys" in p for p in result.problems), result.problems
    assert "raise TORCHKEEP_MAX_HASH_COLLISIONS" in result.problems[0]
    assert "byte" in result.problems[0]  # names the offset
    assert scan_bytes(raw).problems  # a bare pickle too


def test_limit_is_the_knob(monkeypatch) -> None:
    raw = _pickles(64)["dict_p4"]
    assert scan_bytes(raw).problems == []
    monkeypatch.setattr(knobs, "MAX_HASH_COLLISIONS", 63)
    assert FLOOD in scan_bytes(raw).problems[0]


def test_float_and_mixed_keys_are_counted(monkeypatch) -> None:
    """Integral floats hash like ints: 2.0**(61*j) and 1 + k*P61 all hash to 1."""
    monkeypatch.setattr(knobs, "MAX_HASH_COLLISIONS", 20)
    floats = [pickle.BINFLOAT + struct.pack(">d", 2.0 ** (61 * j)) for j in range(16)]
    assert len({hash(2.0 ** (61 * j)) for j in range(16)}) == 1
    raw = _head(4) + _dict(floats + _colliding(10, at=1)) + pickle.STOP
    assert FLOOD in scan_bytes(raw).problems[0]
    monkeypatch.setattr(knobs, "MAX_HASH_COLLISIONS", 26)
    assert scan_bytes(raw).problems == []


def test_keys_of_different_containers_are_not_pooled() -> None:
    keys = _colliding(60)
    raw = _head(4) + pickle.EMPTY_LIST + pickle.MARK + _dict(keys) + _dict(keys) + pickle.APPENDS
    assert scan_bytes(raw + pickle.STOP).problems == []


def _timed_refusal(raw: bytes) -> float:
    start = time.perf_counter()
    problems = scan_bytes(torch_zip(raw), "f.pt").problems
    assert FLOOD in problems[0]
    return time.perf_counter() - start


def test_a_hundred_thousand_colliding_keys_are_refused_fast() -> None:
    """Refusing 100,000 keys scales linearly: at most 20 x what torch.load needs for 5,000 of
    them (quadratic, torch would need 400 x), and 4 x the keys cost well under 16 x the time."""
    control = torch_zip(_pickles(5_000)["dict_p2"])
    start = time.perf_counter()
    torch.load(io.BytesIO(control), weights_only=True)  # quadratic: the control
    quadratic = time.perf_counter() - start
    quarter = _timed_refusal(_pickles(25_000)["dict_p2"])
    elapsed = _timed_refusal(_pickles(100_000)["dict_p2"])
    assert elapsed < 2.0 and elapsed < 20 * quadratic, (elapsed, quadratic)
    assert elapsed < 8 * quarter + 0.05, (elapsed, quarter)


def test_entry_points_refuse(tmp_path) -> None:
    path = tmp_path / "flood.pt"
    path.write_bytes(torch_zip(_pickles(20_000)["optimizer_state"]))
    module = torch.nn.Linear(1, 1)
    for load in (torchkeep.load, lambda p: torchkeep.load_state_dict(module, p)):
        start = time.perf_counter()
        with pytest.raises(UnsafeFileError, match=FLOOD):
            load(str(path))
        assert time.perf_counter() - start < 5
    for command in ("scan", "inspect"):
        result = CliRunner().invoke(cli, [command, str(path)])
        assert result.exit_code != 0 and FLOOD in result.output, result.output
        assert "Traceback" not in result.output
    assert CliRunner().invoke(cli, ["scan", str(path)]).exit_code == 1


def test_dcp_metadata_and_items_are_scanned_first(tmp_path) -> None:
    folder = dcp_folder(str(tmp_path / "meta"))
    with open(os.path.join(folder, ".metadata"), "wb") as handle:
        handle.write(_pickles(100_000)["dict_p4"])
    start = time.perf_counter()
    with pytest.raises(UnsafeFileError, match=FLOOD):
        torchkeep.load(folder)
    assert time.perf_counter() - start < 5
    blob = torch_zip(_pickles(300)["set_p2_reduce"])
    item = dcp_folder(str(tmp_path / "item"), value={"x": 1}, length=len(blob))
    with open(os.path.join(item, "__0_0.distcp"), "wb") as handle:
        handle.write(blob)
    with pytest.raises(UnsafeFileError, match=FLOOD):
        torchkeep.load(item)


def test_legitimate_int_keys_load(tmp_path) -> None:
    """No false positives: a real optimizer state of 10,000 params, range(100000) keys."""
    state = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], momentum=0.9).state_dict()
    state["param_groups"][0]["params"] = list(range(10_000))  # SGD's state for 10,000 params
    flat = torch.zeros(10_000)  # momentum buffers as views of one storage (a fast save)
    state["state"] = {i: {"momentum_buffer": flat[i : i + 1]} for i in range(10_000)}
    path = tmp_path / "opt.pt"
    torch.save(state, path)
    loaded = torchkeep.load(str(path))
    assert len(loaded["state"]) == 10_000
    plain = tmp_path / "ints.pt"
    torch.save({"d": dict.fromkeys(range(100_000), 0), "s": set(range(-50, 50)),
                "o": OrderedDict((float(i), (i, -i)) for i in range(1000))}, plain)  # fmt: skip
    assert len(torchkeep.load(str(plain))["d"]) == 100_000
    result = CliRunner().invoke(cli, ["scan", str(plain)])
    assert result.exit_code == 0, result.output


def _str(text: str) -> bytes:
    return pickle.BINUNICODE + len(text).to_bytes(4, "little") + text.encode()


def _metadata_index(offset: bytes) -> bytes:
    """A DCP ``MetadataIndex('w', torch.Size([offset]))`` the way pickle writes one."""
    size = b"ctorch\nSize\n" + offset + pickle.TUPLE1 + pickle.TUPLE1 + pickle.REDUCE
    return (
        b"ctorch.distributed.checkpoint.metadata\nMetadataIndex\n" + pickle.EMPTY_TUPLE
        + pickle.NEWOBJ + pickle.EMPTY_DICT + pickle.MARK + _str("fqn") + _str("w")
        + _str("offset") + size + pickle.SETITEMS + pickle.BUILD
    )  # fmt: skip


def test_dcp_storage_data_keys_are_counted(tmp_path) -> None:
    """DCP's storage_data is keyed by MetadataIndex, hashed as (fqn, offset): one fqn with
    colliding offsets floods it; distinct offsets (a real sharded tensor) do not."""
    from torch.distributed.checkpoint.metadata import MetadataIndex

    assert hash(MetadataIndex("w", torch.Size([P61]))) == hash(MetadataIndex("w", torch.Size([0])))
    flood = [_metadata_index(k) for k in _colliding(200)]
    raw = _head(4) + pickle.EMPTY_DICT + pickle.MARK + b"".join(k + b"N" for k in flood)
    assert FLOOD in scan_bytes(raw + pickle.SETITEMS + pickle.STOP).problems[0]
    fine = [_metadata_index(_int(k)) for k in range(200)]
    raw = _head(4) + pickle.EMPTY_DICT + pickle.MARK + b"".join(k + b"N" for k in fine)
    assert scan_bytes(raw + pickle.SETITEMS + pickle.STOP).problems == []
    folder = dcp_folder(str(tmp_path / "index"))
    with open(os.path.join(folder, ".metadata"), "wb") as handle:
        handle.write(_head(4) + pickle.EMPTY_DICT + pickle.MARK + b"".join(k + b"N" for k in flood)
                     + pickle.SETITEMS + pickle.STOP)  # fmt: skip
    with pytest.raises(UnsafeFileError, match=FLOOD):
        torchkeep.load(folder)


def test_counter_and_text_memo_indices() -> None:
    """``Counter(list)`` inserts keys too; text PUT indices past 2**32 (which could flood the
    scan's own memo) are refused rather than stored."""
    keys = b"".join(_colliding(100))
    counter = b"ccollections\nCounter\n]" + pickle.MARK + keys + pickle.APPENDS
    assert FLOOD in scan_bytes(_head(2) + counter + pickle.TUPLE1 + b"R.").problems[0]
    memo = b"N" + b"".join(b"p%d\n" % (k * P61) for k in range(1, 4)) + b"."
    assert "memo index" in scan_bytes(memo).problems[0]
    assert scan_bytes(b"Np0\np1\n.").problems == []
