"""save_model/load_model and export_model round trips, checked in a fresh process."""

from __future__ import annotations

from pathlib import Path

import pytest
import safetensors.torch
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import test_model_zoo
import torchkeep
from torchkeep.model.api import KIND_KEY
from torchkeep.transfer.reader import FileReader

zoo = test_model_zoo.zoo  # fixture

FRESH_SCRIPT = """
import json, sys
events = []
sys.addaudithook(lambda event, args: events.append(event) if event == "pickle.find_class" else None)
import torch, torchkeep
from torchkeep.errors import ClassNotAllowedError

expected = torchkeep.load("expected.tk")
out = {}
try:  # the model's module is not imported: refused, and still not imported afterwards
    torchkeep.load_model("net.tk")
    out["refused"] = False
except ClassNotAllowedError as exc:
    out["refused"] = "tkzoo.Net" in str(exc) and "classes=" in str(exc)
out["imported_after_refusal"] = "tkzoo" in sys.modules

x = expected["export_input"]
program = torch.export.load("net.pt2")
out["export_torch"] = torch.allclose(program.module()(x), expected["export_output"], atol=1e-6)
program = torchkeep.load_exported("net.pt2")
out["export_helper"] = torch.allclose(program.module()(x), expected["export_output"], atol=1e-6)
out["imported_after_export"] = "tkzoo" in sys.modules

import tkzoo  # the seed's way: import the class, then load the model
del events[:]
for kind in tkzoo.KINDS:
    model = torchkeep.load_model(kind + ".tk")
    with torch.no_grad():  # same (fast) path as the expected outputs
        y = tkzoo.run(model, expected["input_" + kind])
    out[kind] = bool(torch.equal(y, expected["output_" + kind])) and not model.training
net = torchkeep.load_model("net.tk")
out["tied"] = net.heads["lm"].weight is net.emb.weight
out["non_persistent"] = (
    "cache" in net.blocks[0]._buffers and "blocks.0.cache" not in net.state_dict()
)
out["act"] = net.blocks[1].act is torch.tanh
out["pickle_events"] = len(events)
print(json.dumps(out))
"""


def test_every_kind_round_trips_in_a_fresh_process(zoo, tmp_path) -> None:
    expected = {}
    for kind in zoo.KINDS:
        model, x = zoo.build(kind)
        torchkeep.save_model(model, tmp_path / f"{kind}.tk")
        model.eval()
        with torch.no_grad():
            expected[f"input_{kind}"], expected[f"output_{kind}"] = x, zoo.run(model, x)
    net, idx = zoo.build("net")
    torchkeep.export_model(net, tmp_path / "net.pt2", (idx,))
    expected["export_input"], expected["export_output"] = idx, net.eval()(idx).detach()
    torchkeep.save(expected, tmp_path / "expected.tk")
    result = test_model_zoo.run_fresh(FRESH_SCRIPT, tmp_path, tmp_path / "zoo")
    assert result == {
        "refused": True,
        "imported_after_refusal": False,
        "export_torch": True,
        "export_helper": True,
        "imported_after_export": False,
        **{kind: True for kind in zoo.KINDS},
        "tied": True,
        "non_persistent": True,
        "act": True,
        "pickle_events": 0,
    }


def test_same_process_round_trip_keeps_structure(zoo, tmp_path) -> None:
    model, idx = zoo.build("net")
    model.blocks[0].train(False)  # a mixed training flag survives in the tree
    torchkeep.save_model(model, tmp_path / "m.tk")
    loaded = torchkeep.load_model(tmp_path / "m.tk")
    assert type(loaded) is zoo.Net and type(loaded.blocks[0]) is zoo.Block
    assert loaded.config == {"name": "net", "sizes": (11, 8), "dtype": torch.float32}
    assert loaded.blocks[0].act is torch.nn.functional.gelu
    assert [n for n, _ in loaded.named_parameters()] == [n for n, _ in model.named_parameters()]
    assert all(isinstance(p, nn.Parameter) and p.requires_grad for p in loaded.parameters())
    assert torch.equal(loaded(idx), model.eval()(idx))


def test_whole_model_file_is_a_state_dict_file(zoo, tmp_path) -> None:
    """Keys equal model.state_dict(); the file loads into a fresh model with load_state_dict."""
    model, x = zoo.build("net")
    path = tmp_path / "m.tk"
    torchkeep.save_model(model, path)
    with FileReader(path) as reader:
        assert reader.metadata[KIND_KEY] == "model"
        keys = set(reader.keys())
    assert set(model.state_dict()) - keys == {"heads.lm.weight"}  # tied: stored once (alias)
    stock = safetensors.torch.load_file(path)  # interoperable: stock safetensors opens it
    assert torch.equal(stock["emb.weight"], model.emb.weight.detach())
    fresh = zoo.Net()
    report = torchkeep.load_state_dict(fresh, path)
    assert report.ok
    assert torch.equal(fresh.eval()(x), model.eval()(x))


def test_shared_submodule_and_wrappers(tmp_path) -> None:
    shared = nn.Linear(3, 3)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    torchkeep.save_model(nn.DataParallel(model), tmp_path / "m.tk")  # wrapper removed
    loaded = torchkeep.load_model(tmp_path / "m.tk", map_location="cpu")
    assert type(loaded) is nn.Sequential and loaded[0] is loaded[2]
    torchkeep.save_model(torch.compile(model), tmp_path / "c.tk")  # not compiled until called
    assert type(torchkeep.load_model(tmp_path / "c.tk")) is nn.Sequential
    x = torch.randn(2, 3)
    assert torch.equal(loaded(x), model(x))


def test_non_finite_and_odd_plain_attributes(tmp_path) -> None:
    model = nn.Linear(2, 2)
    model.limits = (float("inf"), -1, None, "s", b"raw", torch.int8, torch.device("cpu"))
    model.table = {1: [1.5, {"k": (2, 3)}]}
    model.lookup = torch.arange(3)  # a plain tensor attribute (not a buffer)
    torchkeep.save_model(model, tmp_path / "m.tk")
    loaded = torchkeep.load_model(tmp_path / "m.tk")
    assert loaded.limits == model.limits and loaded.table == model.table
    assert torch.equal(loaded.lookup, model.lookup)


def test_recurrent_flat_weights_stay_the_parameters(zoo, tmp_path) -> None:
    model, x = zoo.build("recurrent")
    torchkeep.save_model(model, tmp_path / "m.tk")
    loaded = torchkeep.load_model(tmp_path / "m.tk")
    own = [getattr(loaded, name) for name in loaded._flat_weights_names]
    assert all(a is b for a, b in zip(loaded._flat_weights, own, strict=True))
    with torch.no_grad():
        assert torch.equal(loaded(x)[0], model.eval()(x)[0])


_plain = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=8)
    | st.sampled_from([torch.float16, torch.int64, torch.bool]),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.tuples(inner, inner)
        | st.dictionaries(st.text(max_size=4) | st.integers(), inner, max_size=3)
    ),
    max_leaves=8,
)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(value=_plain)
def test_plain_attributes_round_trip_exactly(tmp_path, value) -> None:
    model = nn.ReLU()
    model.extra_config = value
    torchkeep.save_model(model, tmp_path / "m.tk")
    loaded = torchkeep.load_model(tmp_path / "m.tk")
    assert loaded.extra_config == value
    assert repr(loaded.extra_config) == repr(value)  # types too (tuple vs list, int vs float)


def test_corruption_is_detected(tmp_path) -> None:
    path = tmp_path / "m.tk"
    torchkeep.save_model(nn.Linear(64, 64), path)
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # a weight byte
    path.write_bytes(bytes(data))
    with pytest.raises(torchkeep.CorruptionError):
        torchkeep.load_model(path)


def _golden_model() -> nn.Module:
    """The model in tests/golden/v1_model_sequential.tk, built by hand (deterministic weights)."""
    model = nn.Sequential(
        nn.Linear(3, 4),
        nn.ReLU(),
        nn.BatchNorm1d(4),
        nn.TransformerEncoderLayer(4, 1, 8, dropout=0.0, batch_first=True),
    )
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            p.copy_(torch.linspace(-1, 1, p.numel()).reshape(p.shape) * (i % 3 + 1) / 4)
        model[2].running_mean.copy_(torch.tensor([0.1, -0.2, 0.3, 0.0]))
        model[2].running_var.copy_(torch.tensor([1.0, 2.0, 0.5, 1.5]))
        model[2].num_batches_tracked.fill_(7)
    return model.eval()


def test_golden_whole_model_file_still_loads() -> None:
    golden = Path(__file__).parent / "golden" / "v1_model_sequential.tk"
    loaded = torchkeep.load_model(golden)
    expected = _golden_model()
    assert int(loaded[2].num_batches_tracked) == 7
    assert loaded[3].activation is torch.nn.functional.relu
    x = torch.linspace(-2, 2, 6).reshape(2, 3)
    with torch.no_grad():
        assert torch.equal(loaded(x), expected(x))
