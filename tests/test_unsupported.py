"""Unsupported values fail before any byte is written, naming the key path."""

from __future__ import annotations

import collections
import enum
import io
import re
import warnings

import numpy as np
import pytest
import torch

import torchkeep
from torchkeep import UnsupportedValueError


class Custom:
    pass


class Color(enum.IntEnum):
    RED = 1


def _quantized() -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # quantized tensors are deprecated, still constructible
        return torch.quantize_per_tensor(torch.ones(2), 0.1, 0, torch.qint8)


def checkpoint_with(value) -> dict:
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    optim_state = opt.state_dict()
    optim_state["param_groups"][0]["foo"] = value
    return {"epoch": 1, "model_state": model.state_dict(), "optim_state": optim_state}


VALUES = {
    "lambda": lambda x: x,
    "function": print,
    "object": Custom(),
    "class": Custom,
    "module": torch,
    "file-handle": io.BytesIO(b"x"),
    "set-of-tensors": {torch.ones(1)},
    "int-subclass": Color.RED,
    "defaultdict": collections.defaultdict(int),
    "namedtuple": collections.namedtuple("P", "x y")(1, 2),
    "object-array": np.array([Custom()], dtype=object),
    "string-array": np.array(["a", "b"]),
    "sparse": torch.eye(3).to_sparse(),
    "quantized": _quantized(),
    "meta-tensor": torch.empty(2, device="meta"),
    "tensor-subclass": torch.ones(2).as_subclass(type("MyTensor", (torch.Tensor,), {})),
    "ellipsis": ...,
    "generator": (i for i in range(2)),
    "huge-int": 10**5000,
}


@pytest.mark.parametrize("name", list(VALUES))
def test_unsupported_value_named_by_key_path(tmp_path, name):
    path = tmp_path / "ckpt.tk"
    path.write_bytes(b"previous content")
    with pytest.raises(UnsupportedValueError) as info:
        torchkeep.save(checkpoint_with(VALUES[name]), path)
    assert re.match(r"optim_state\.param_groups\[0\]\.foo\b", str(info.value)), str(info.value)
    assert path.read_bytes() == b"previous content"
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.tk"]


def test_nothing_created_for_new_path(tmp_path):
    with pytest.raises(UnsupportedValueError):
        torchkeep.save({"a": [1, {"b": lambda: 0}]}, tmp_path / "new.tk")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "obj, where",
    [
        ({"a": [1, {"b": Custom()}]}, "a[1].b"),
        ({3: {"x": (1, Custom())}}, "[3].x[1]"),
        ([Custom()], "[0]"),
        (Custom(), "<root>"),
        ({"k": {Custom(): 1}}, "k"),
        ({"t": {torch.ones(1): 1}}, "t"),
    ],
)
def test_error_paths(tmp_path, obj, where):
    with pytest.raises(UnsupportedValueError) as info:
        torchkeep.save(obj, tmp_path / "x.tk")
    assert str(info.value).startswith(where), str(info.value)


def test_cycles_and_depth(tmp_path):
    loop: list = [1]
    loop.append(loop)
    with pytest.raises(UnsupportedValueError, match="cycle"):
        torchkeep.save({"loop": loop}, tmp_path / "x.tk")
    deep: list = []
    for _ in range(1000):
        deep = [deep]
    with pytest.raises(UnsupportedValueError, match="nesting"):
        torchkeep.save(deep, tmp_path / "x.tk")
    assert list(tmp_path.iterdir()) == []


def test_error_says_what_to_do(tmp_path):
    with pytest.raises(UnsupportedValueError) as info:
        torchkeep.save({"obj": Custom()}, tmp_path / "x.tk")
    assert "convert it or leave it out" in str(info.value)
    assert isinstance(info.value, torchkeep.TorchkeepError)


def test_shared_object_is_not_a_cycle(tmp_path):
    shared = {"lr": 0.1}
    obj = {"a": shared, "b": shared, "c": [shared, shared]}
    assert torchkeep.load(torchkeep.save(obj, tmp_path / "x.tk") or tmp_path / "x.tk") == obj
