"""What whole-model saving refuses: unsafe attributes at save time, unallowed classes at load."""

from __future__ import annotations

import os
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import test_model_zoo
import torchkeep
from torchkeep.errors import (
    ClassNotAllowedError,
    FormatError,
    TorchkeepError,
    UnsupportedValueError,
)
from torchkeep.model.api import KIND_KEY, KIND_VALUE, MODEL_ENTRY

zoo = test_model_zoo.zoo  # fixture


def node(cls: str, **extra) -> dict:
    base = {"class": cls, "training": False, "params": {}, "buffers": {}, "modules": {}}
    base.update(extra)
    return base


def hostile(path, root: dict, tensors: dict | None = None) -> str:
    """A file that claims to be a whole model, crafted with the ordinary writer."""
    obj = {**(tensors or {}), MODEL_ENTRY: {"version": 1, "root": root, "extra": {}}}
    torchkeep.save(obj, path, metadata={KIND_KEY: KIND_VALUE})
    return str(path)


# ------------------------------------------------------------------------------- save time


def test_lambda_attribute_is_refused_naming_its_path(zoo, tmp_path) -> None:
    model = zoo.Net()
    model.blocks[0].act = lambda x: x * 2
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(UnsupportedValueError, match=r"blocks\.0\.act"):
        torchkeep.save_model(model, out / "m.tk")
    assert os.listdir(out) == []  # nothing written, not even a temporary


def test_open_file_and_non_torch_functions_are_refused(tmp_path) -> None:
    model = nn.Sequential(nn.Linear(2, 2))
    with open(tmp_path / "f.txt", "w") as handle:
        model[0].log = handle
        with pytest.raises(UnsupportedValueError, match=r"0\.log"):
            torchkeep.save_model(model, tmp_path / "m.tk")
    model[0].log = None
    model[0].fn = torch.load  # a Python function, not a builtin op: never stored by name
    with pytest.raises(UnsupportedValueError, match=r"0\.fn.*torch\.nn\.functional"):
        torchkeep.save_model(model, tmp_path / "m.tk")
    model[0].fn = print
    with pytest.raises(UnsupportedValueError, match=r"0\.fn"):
        torchkeep.save_model(model, tmp_path / "m.tk")


def test_local_class_and_hidden_module_are_refused(tmp_path) -> None:
    class Local(nn.Module):
        pass

    with pytest.raises(UnsupportedValueError, match="module level"):
        torchkeep.save_model(nn.Sequential(Local()), tmp_path / "m.tk")
    model = nn.Linear(2, 2)
    object.__setattr__(model, "sidecar", nn.ReLU())
    with pytest.raises(UnsupportedValueError, match="sidecar"):
        torchkeep.save_model(model, tmp_path / "m.tk")


def test_parametrized_modules_are_refused(tmp_path) -> None:
    model = nn.utils.parametrizations.weight_norm(nn.Linear(3, 2))
    with pytest.raises(UnsupportedValueError, match="remove_parametrizations"):
        torchkeep.save_model(model, tmp_path / "m.tk", drop_hooks=True)


def test_hooks_are_refused_unless_dropped(tmp_path) -> None:
    model = nn.Sequential(nn.Linear(2, 2))
    model[0].register_forward_hook(lambda mod, args, out: out)
    with pytest.raises(UnsupportedValueError, match=r"0: .*_forward_hooks.*drop_hooks=True"):
        torchkeep.save_model(model, tmp_path / "m.tk")
    with pytest.warns(UserWarning, match=r"hooks not saved: 0\._forward_hooks"):
        torchkeep.save_model(model, tmp_path / "m.tk", drop_hooks=True)
    loaded = torchkeep.load_model(tmp_path / "m.tk")
    assert not loaded[0]._forward_hooks
    x = torch.randn(1, 2)
    assert torch.equal(loaded(x), model(x))


def test_not_a_module_and_torchscript(tmp_path) -> None:
    with pytest.raises(UnsupportedValueError, match="expects an nn.Module"):
        torchkeep.save_model({"w": torch.zeros(1)}, tmp_path / "m.tk")
    model = nn.Sequential(nn.Linear(2, 2))
    with pytest.raises(UnsupportedValueError, match="torch.jit.save"):
        torchkeep.save_model(torch.jit.script(model), tmp_path / "m.tk")
    torchkeep.save_model(model, tmp_path / "m.tk")  # scripting left caches on the original
    assert type(torchkeep.load_model(tmp_path / "m.tk")[0]) is nn.Linear


def test_dunder_attribute_is_refused_at_save_time(tmp_path) -> None:
    model = nn.Linear(2, 2)
    model.__dict__["__weird__"] = 1
    with pytest.raises(UnsupportedValueError, match="__weird__"):
        torchkeep.save_model(model, tmp_path / "m.tk")


# ------------------------------------------------------------------------------- load time


def test_class_from_a_module_not_imported_is_refused_and_not_imported(tmp_path) -> None:
    path = hostile(tmp_path / "h.tk", node("tk_never_imported_pkg.models:Evil"))
    with pytest.raises(ClassNotAllowedError) as info:
        torchkeep.load_model(path)
    message = str(info.value)
    for hint in ("tk_never_imported_pkg.models.Evil", "import", "classes=[Evil]", "trusted=True"):
        assert hint in message
    assert "tk_never_imported_pkg" not in sys.modules
    with pytest.raises(ClassNotAllowedError, match="cannot be imported"):
        torchkeep.load_model(path, trusted=True)


@pytest.mark.parametrize(
    "cls", ["collections:OrderedDict", "subprocess:Popen", "os:system", "builtins:eval"]
)
def test_non_module_classes_are_refused(tmp_path, cls) -> None:
    path = hostile(tmp_path / "h.tk", node("torch.nn:Sequential", modules={"0": node(cls)}))
    with pytest.raises(ClassNotAllowedError, match="not an nn.Module subclass"):
        torchkeep.load_model(path)


@pytest.mark.parametrize("ref", ["os:system", "builtins:print", "torch:load", "torch:Tensor"])
def test_function_references_outside_the_allow_list_are_refused(tmp_path, ref) -> None:
    path = hostile(tmp_path / "h.tk", node("torch.nn:ReLU", functions={"act": ref}))
    with pytest.raises(ClassNotAllowedError, match="act"):
        torchkeep.load_model(path)


@pytest.mark.parametrize(
    "extra",
    [
        {"attrs": {"__class__": "x"}},
        {"attrs": {"_forward_hooks": {}}},
        {"functions": {"forward": "torch:relu"}},
        {"params": {"weight": "no.such.key"}},
        {"modules": {"a": {"shared": "nowhere"}}},
        {"class": "torch.nn:Linear; import os"},
        {"class": "torch.nn:__class__"},
        {"class": "torch.nn:LSTM", "attrs": {"_all_weights": [[1]]}},
    ],
)
def test_malformed_descriptions_are_format_errors(tmp_path, extra) -> None:
    path = hostile(tmp_path / "h.tk", {**node("torch.nn:ReLU"), **extra})
    with pytest.raises(FormatError):
        torchkeep.load_model(path)


def test_allowed_by_classes_list_and_by_moved_name(zoo, tmp_path) -> None:
    torchkeep.save_model(zoo.Model(3), tmp_path / "m.tk")
    del sys.modules["tkzoo"]  # as if the caller had not imported it
    with pytest.raises(ClassNotAllowedError, match="tkzoo"):
        torchkeep.load_model(tmp_path / "m.tk")
    assert type(torchkeep.load_model(tmp_path / "m.tk", classes=[zoo.Model])) is zoo.Model
    moved = torchkeep.load_model(tmp_path / "m.tk", classes={"tkzoo:Model": zoo.Model})
    assert type(moved) is zoo.Model


def test_plain_torchkeep_file_is_not_a_model(tmp_path) -> None:
    torchkeep.save({"w": torch.zeros(2)}, tmp_path / "sd.tk")
    with pytest.raises(FormatError, match="load_state_dict"):
        torchkeep.load_model(tmp_path / "sd.tk")


HOSTILE_SCRIPT = """
import json, os, sys
events = []
watched = ("os.system", "subprocess.Popen", "os.posix_spawn", "os.exec", "os.fork")
sys.addaudithook(lambda event, args: events.append(event) if event in watched else None)
import subprocess  # imported: its Popen resolves, and must still be refused
import torchkeep
results = []
for name in sorted(os.listdir(".")):
    if name.startswith("hostile"):
        try:
            torchkeep.load_model(name)
            results.append("loaded " + name)
        except torchkeep.TorchkeepError as exc:
            results.append(type(exc).__name__)
print(json.dumps({"results": results, "events": events, "sentinel": os.path.exists("sentinel"),
                  "http": "http.server" in sys.modules}))
"""


def test_hostile_files_run_nothing_in_a_fresh_process(tmp_path) -> None:
    touch = {"args": ["touch", "sentinel"], "command": "touch sentinel"}
    roots = [
        node("os:system", attrs=touch),
        node("subprocess:Popen", attrs=touch),
        node("posix:system", attrs=touch),
        node("http.server:HTTPServer"),
        node("torch.nn:Sequential", modules={"0": node("subprocess:Popen", attrs=touch)}),
        node("torch.nn:ReLU", functions={"act": "os:system"}),
        node("torch.nn:ReLU", functions={"act": "builtins:exec"}),
    ]
    for i, root in enumerate(roots):
        hostile(tmp_path / f"hostile{i}.tk", root)
    result = test_model_zoo.run_fresh(HOSTILE_SCRIPT, tmp_path)
    assert result["results"] == ["ClassNotAllowedError"] * len(roots)
    assert result == {**result, "events": [], "sentinel": False, "http": False}
    assert issubclass(ClassNotAllowedError, TorchkeepError)


_classes = st.sampled_from(
    ["torch.nn:Linear", "torch.nn:ReLU", "torch.nn:LSTM", "torch.nn:MultiheadAttention",
     "torch.nn:Sequential", "torch.nn:BatchNorm1d", "os:system", "x", "a:b:c", 3]
)  # fmt: skip
_values = st.none() | st.integers(-3, 3) | st.text(max_size=3) | st.lists(st.integers(), max_size=2)
_names = st.sampled_from(["weight", "bias", "in_features", "_all_weights", "num_layers", "x"])


@st.composite
def _nodes(draw, depth=0):
    node = {"class": draw(_classes), "training": draw(st.booleans())}
    node["attrs"] = draw(st.dictionaries(_names, _values, max_size=3))
    node["params"] = draw(st.dictionaries(_names, st.sampled_from(["w", "nope", None]), max_size=2))
    node["functions"] = draw(
        st.dictionaries(_names, st.sampled_from(["torch:relu", "x"]), max_size=1)
    )
    if depth < 2:
        node["modules"] = draw(
            st.dictionaries(st.sampled_from(["0", "1"]), _nodes(depth + 1), max_size=2)
        )
    return node


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(root=_nodes())
def test_random_descriptions_fail_only_with_torchkeep_errors(tmp_path, root) -> None:
    path = hostile(tmp_path / "h.tk", root, {"w": torch.ones(2, 2)})
    try:
        torchkeep.load_model(path)
    except TorchkeepError:
        pass
