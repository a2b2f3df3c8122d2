"""Interop with the stock safetensors library, in both directions."""

from __future__ import annotations

import collections

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import torchkeep
from torchkeep.format.header import FORMAT_VERSION
from torchkeep.transfer.reader import FileReader


def checkpoint() -> dict:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 6)).sum().backward()
    opt.step()
    return {"epoch": 90, "model_state": model.state_dict(), "optim_state": opt.state_dict()}


def test_stock_safe_open_reads_every_tensor_by_flattened_key(tmp_path):
    ckpt = checkpoint()
    path = tmp_path / "ckpt.tk"
    torchkeep.save(ckpt, path)
    expected = {f"model_state.{k}": v for k, v in ckpt["model_state"].items()}
    for idx, state in ckpt["optim_state"]["state"].items():
        expected[f"optim_state.state.{idx}.momentum_buffer"] = state["momentum_buffer"]
    with safe_open(str(path), framework="pt") as handle:
        assert set(handle.keys()) == set(expected)
        for key, value in expected.items():
            assert torch.equal(handle.get_tensor(key), value), key
        meta = handle.metadata()
    assert meta["format"] == "pt" and meta["torchkeep.version"] == FORMAT_VERSION
    assert torch.equal(
        load_file(str(path))["model_state.0.weight"], ckpt["model_state"]["0.weight"]
    )


@pytest.mark.parametrize(
    "dtype",
    [torch.bfloat16, torch.float16, torch.float8_e4m3fn, torch.float8_e5m2, torch.bool,
     torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8, torch.float64],
    ids=str,
)  # fmt: skip
def test_stock_reader_sees_native_dtypes(tmp_path, dtype):
    value = (torch.arange(-3, 5) % 2 == 0) if dtype == torch.bool else torch.arange(-3, 5)
    value = value.to(dtype) if dtype != torch.uint8 else torch.arange(8).to(dtype)
    torchkeep.save({"x": value, "scalar": value[0].clone()}, tmp_path / "d.tk")
    loaded = load_file(str(tmp_path / "d.tk"))
    assert loaded["x"].dtype == dtype and torch.equal(loaded["x"], value)
    assert loaded["scalar"].shape == ()


def test_raw_dtype_visible_as_bytes(tmp_path):
    value = torch.tensor([1 + 2j, 3 - 4j], dtype=torch.complex128)
    torchkeep.save({"z": value}, tmp_path / "c.tk")
    raw = load_file(str(tmp_path / "c.tk"))["z"]
    assert raw.dtype == torch.uint8 and torch.equal(raw.view(torch.complex128), value)


def test_shared_and_views_are_readable_by_stock(tmp_path):
    base = torch.randn(4, 5)
    torchkeep.save({"w": base, "tied": base, "row": base[2]}, tmp_path / "s.tk")
    loaded = load_file(str(tmp_path / "s.tk"))
    assert set(loaded) == {"w"} and torch.equal(loaded["w"], base)


def test_data_section_is_aligned_for_mmap(tmp_path):
    torchkeep.save({"a": torch.ones(3, dtype=torch.int8), "b": torch.ones(5)}, tmp_path / "a.tk")
    with FileReader(tmp_path / "a.tk") as reader:
        assert reader.header.data_start % 64 == 0
        assert reader.entry("b").begin % 4 == 0  # wider dtypes come first


def test_torchkeep_loads_stock_files(tmp_path):
    tensors = {
        "w": torch.randn(3, 4),
        "b": torch.arange(4, dtype=torch.int64),
        "h": torch.randn(2).to(torch.bfloat16),
        "e": torch.zeros(0, 3),
    }
    path = tmp_path / "stock.safetensors"
    save_file(tensors, str(path), metadata={"source": "stock"})
    for mmap in (False, True):
        out = torchkeep.load(path, mmap=mmap)
        assert set(out) == set(tensors)
        for key, value in tensors.items():
            assert torch.equal(out[key], value) and out[key].dtype == value.dtype
    assert torchkeep.verify(path) == []  # nothing to verify: no checksums in stock files


def test_stock_file_into_module(tmp_path):
    model = nn.Linear(3, 2)
    path = tmp_path / "m.safetensors"
    src = nn.Linear(3, 2)
    save_file(src.state_dict(), str(path))
    report = torchkeep.load_state_dict(model, path)
    assert report.ok and torch.equal(model.weight, src.weight)


def test_ordered_state_dict_round_trips_through_stock(tmp_path):
    """A stock reader and torchkeep agree on values; torchkeep also keeps the order."""
    sd = collections.OrderedDict((f"layer{i}", torch.full((2,), float(i))) for i in range(12))
    torchkeep.save(sd, tmp_path / "o.tk")
    assert list(torchkeep.load(tmp_path / "o.tk")) == list(sd)
    stock = load_file(str(tmp_path / "o.tk"))
    assert all(torch.equal(stock[k], v) for k, v in sd.items())


@pytest.mark.parametrize("mmap", [False, True], ids=["read", "mmap"])
def test_misaligned_foreign_file_loads(tmp_path, mmap):
    """Other writers may place an F32 right after 3 bytes of U8: still loads, by copy if needed."""
    import json
    import struct

    entries = {
        "a": {"dtype": "U8", "shape": [3], "data_offsets": [0, 3]},
        "b": {"dtype": "F32", "shape": [2], "data_offsets": [3, 11]},
        "c": {"dtype": "F64", "shape": [1], "data_offsets": [11, 19]},
    }
    head = json.dumps(entries).encode()
    data = bytes([1, 2, 3]) + struct.pack("<ff", 1.5, 2.5) + struct.pack("<d", 3.25)
    path = tmp_path / "odd.safetensors"
    path.write_bytes(struct.pack("<Q", len(head)) + head + data)
    out = torchkeep.load(path, mmap=mmap)
    assert out["a"].tolist() == [1, 2, 3] and out["b"].tolist() == [1.5, 2.5]
    assert out["c"].tolist() == [3.25]
    assert load_file(str(path))["b"].tolist() == [1.5, 2.5]
