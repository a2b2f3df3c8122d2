"""Class-valued attributes and plain configuration objects in whole models (issue 21.1-2):
torchvision-style ``_norm_layer = nn.BatchNorm2d``, ``act_layer=nn.GELU``, dataclass and
simple config objects; what cannot be rebuilt from plain data is refused with its key path."""

from __future__ import annotations

import dataclasses
import functools
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchkeep
from torchkeep.errors import ClassNotAllowedError, FormatError, UnsupportedValueError
from torchkeep.model.api import KIND_KEY, KIND_VALUE, MODEL_ENTRY


@dataclasses.dataclass
class BlockConfig:
    width: int = 8
    act: type = nn.GELU
    dims: tuple = (1, 2)


@dataclasses.dataclass(frozen=True)
class Frozen:
    eps: float = 1e-5
    inner: BlockConfig = dataclasses.field(default_factory=BlockConfig)


class Bag:
    """A simple config object: attributes set in __init__ (which load_model never calls)."""

    def __init__(self, **kw):
        self.__dict__.update(kw)
        self.inits = getattr(self, "inits", 0) + 1

    @property
    def doubled(self) -> int:
        return 2 * self.width


class Slotted:
    __slots__ = ("width",)

    def __init__(self):
        self.width = 3


class TimmLike(nn.Module):
    """timm blocks keep ``norm_layer=partial(nn.LayerNorm, eps=1e-6)`` and call it later."""

    def __init__(self, norm_layer=None):
        super().__init__()
        norm_layer = norm_layer or functools.partial(nn.LayerNorm, eps=1e-6)
        self.norm_layer = norm_layer
        self.acts = {"gelu": functools.partial(F.gelu, approximate="tanh"), "relu": nn.ReLU}
        self.norm = norm_layer(4)

    def forward(self, x):
        return self.acts["gelu"](self.norm(x))


class ResNetLike(nn.Module):
    """torchvision's ResNet keeps its norm layer class; timm blocks keep act_layer."""

    def __init__(self, norm_layer=None, act_layer=nn.GELU, cfg=None):
        super().__init__()
        self._norm_layer = norm_layer or nn.BatchNorm2d
        self.act_layer = act_layer
        self.layer_classes = [nn.Conv2d, nn.Identity]
        self.cfg = cfg or BlockConfig()
        self.frozen = Frozen()
        self.bag = Bag(width=4, nested={"cfg": self.cfg})
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = self._norm_layer(4)
        self.act = self.act_layer()

    def forward(self, x):
        return self.act(self.bn(self.conv(x))) * self.cfg.width * self.frozen.eps


def test_torchvision_style_round_trip(tmp_path) -> None:
    torch.manual_seed(0)
    model = ResNetLike(act_layer=nn.SiLU).eval()
    path = tmp_path / "m.tk"
    torchkeep.save_model(model, path)
    loaded = torchkeep.load_model(path)
    x = torch.randn(1, 3, 8, 8)
    assert torch.equal(model(x), loaded(x))
    assert loaded._norm_layer is nn.BatchNorm2d and loaded.act_layer is nn.SiLU
    assert loaded.layer_classes == [nn.Conv2d, nn.Identity]
    assert loaded.cfg == model.cfg and type(loaded.cfg) is BlockConfig
    assert loaded.frozen == model.frozen and type(loaded.frozen) is Frozen
    with pytest.raises(dataclasses.FrozenInstanceError):
        loaded.frozen.eps = 1.0  # still frozen
    assert loaded.bag.nested["cfg"] is loaded.cfg  # one object, as in the original
    assert loaded.bag.inits == 1 and loaded.bag.doubled == 8  # __init__ not run again


def test_partial_of_classes_and_functions(tmp_path) -> None:
    model = TimmLike().eval()
    torchkeep.save_model(model, tmp_path / "m.tk")
    loaded = torchkeep.load_model(tmp_path / "m.tk")
    x = torch.randn(2, 4)
    assert torch.equal(model(x), loaded(x))
    part = loaded.norm_layer
    assert isinstance(part, functools.partial) and part.func is nn.LayerNorm
    assert part.keywords == {"eps": 1e-6} and part(4).eps == 1e-6  # still usable
    assert loaded.acts["relu"] is nn.ReLU and loaded.acts["gelu"].func is F.gelu
    model.norm_layer = functools.partial(lambda n: n, 3)
    with pytest.raises(UnsupportedValueError, match="norm_layer"):
        torchkeep.save_model(model, tmp_path / "bad.tk")


def test_config_class_needs_the_allow_list(tmp_path) -> None:
    """A config class whose module is not imported is refused like a module class."""
    mod = types.ModuleType("tk_cfgmod")
    exec("class Cfg:\n    def __init__(self):\n        self.n = 2\n", mod.__dict__)
    mod.Cfg.__module__ = "tk_cfgmod"
    sys.modules["tk_cfgmod"] = mod
    try:
        model = nn.Linear(2, 2)
        model.cfg = mod.Cfg()
        torchkeep.save_model(model, tmp_path / "m.tk")
    finally:
        del sys.modules["tk_cfgmod"]
    with pytest.raises(ClassNotAllowedError, match="tk_cfgmod"):
        torchkeep.load_model(tmp_path / "m.tk")
    loaded = torchkeep.load_model(tmp_path / "m.tk", classes={"tk_cfgmod:Cfg": mod.Cfg})
    assert type(loaded.cfg) is mod.Cfg and loaded.cfg.n == 2


@pytest.mark.parametrize(
    "value, words",
    [
        (Slotted(), "__slots__"),
        (torch.Generator(), "builtin"),
        (open, "cannot be saved"),
        ({"k": Slotted()}, "['k']"),
        (BlockConfig(act=lambda x: x), "act"),
    ],
    ids=["slots", "builtin-base", "builtin-function", "nested-key-path", "lambda-in-config"],
)
def test_unrebuildable_values_refused_with_key_path(tmp_path, value, words) -> None:
    model = nn.Sequential(nn.Linear(2, 2))
    model[0].extra = value
    with pytest.raises(UnsupportedValueError) as info:
        torchkeep.save_model(model, tmp_path / "m.tk")
    assert "0.extra" in str(info.value) and words in str(info.value)
    assert not (tmp_path / "m.tk").exists()


def test_plain_models_keep_layout_1(tmp_path) -> None:
    """Files without classes or objects stay readable by older torchkeep versions."""
    torchkeep.save_model(nn.Sequential(nn.Linear(2, 2)), tmp_path / "m.tk")
    assert torchkeep.load(tmp_path / "m.tk")["__torchkeep_model__"]["version"] == 1


def _forged(path, values: dict, objects) -> str:
    node = {"class": "torch.nn:ReLU", "training": False, "params": {}, "buffers": {},
            "modules": {}, "values": values}  # fmt: skip
    entry = {"version": 2, "root": node, "extra": {}, "objects": objects}
    torchkeep.save({MODEL_ENTRY: entry}, path, metadata={KIND_KEY: KIND_VALUE})
    return str(path)


@pytest.mark.parametrize(
    "values, objects, trusted",
    [
        ({"a": {"dict": [[1.5, {"plain": 1}]]}}, [], False),
        ({"a": {"dict": [[2**62, {"plain": 1}]]}}, [], False),
        ({"a": {"object": 0}}, "not a list", False),
        ({"a": {"object": 0}}, [{"class": "tests:X"}], False),
        ({"a": {"object": -1}}, [], False),
        ({"a": {"object": 0}}, [{"class": "collections:OrderedDict", "state": {}}], True),
        ({"a": {"object": 0}}, [{"class": "pathlib:PurePath", "state": {"x": {"plain": 1}}}], True),
        ({"a": {"plain": 1, "class": "torch.nn:ReLU"}}, [], False),
        ({"a": {"list": "no"}}, [], False),
        ({"forward": {"class": "torch.nn:ReLU"}}, [], False),  # would shadow a method
    ],
    ids=[
        "float-key",
        "huge-int-key",
        "table",
        "entry",
        "index",
        "builtin",
        "slots",
        "two-tags",
        "list",
        "shadow",
    ],  # fmt: skip
)
def test_malformed_values_are_format_errors(tmp_path, values, objects, trusted) -> None:
    path = _forged(tmp_path / "m.tk", values, objects)
    with pytest.raises(FormatError):
        torchkeep.load_model(path, trusted=trusted)


class OwnSetstate(nn.Module):
    """A module class with its own __setstate__: rebuilding it would run that code."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(2, 2)
        self.scale = 3

    def __setstate__(self, state):
        super().__setstate__(state)
        self.restored = True


def test_own_setstate_warns_at_save_and_needs_trust(tmp_path) -> None:
    path = tmp_path / "m.tk"
    with pytest.warns(UserWarning, match=r"OwnSetstate \(OwnSetstate.__setstate__\)"):
        torchkeep.save_model(OwnSetstate(), path)
    with pytest.raises(ClassNotAllowedError, match="__setstate__"):
        torchkeep.load_model(path)
    loaded = torchkeep.load_model(path, trusted=True)  # pickle semantics: the class's code runs
    assert loaded.restored is True and loaded.scale == 3
