"""Legacy ``torch.save(model)`` pickles: refused by default, loaded when trusted, converted once."""

from __future__ import annotations

import os

import pytest
import torch

import test_model_zoo
import torchkeep
from torchkeep.errors import FormatError, UnsafeFileError

zoo = test_model_zoo.zoo  # fixture


@pytest.fixture
def legacy(zoo, tmp_path):
    model, x = zoo.build("net")
    path = tmp_path / "old.pth"
    torch.save(model, path)
    return path, model.eval(), x


def test_legacy_pickle_is_refused_listing_its_globals(legacy) -> None:
    path, _, _ = legacy
    with pytest.raises(UnsafeFileError) as info:
        torchkeep.load_model(path)
    assert "tkzoo.Net" in info.value.globals and "tkzoo.Block" in info.value.globals
    message = str(info.value)
    assert "tkzoo.Net" in message and "trusted=True" in message and "convert" in message


def test_legacy_pickle_loads_when_trusted(legacy) -> None:
    path, model, x = legacy
    loaded = torchkeep.load_model(path, trusted=True)
    assert type(loaded) is type(model) and not loaded.training
    assert torch.equal(loaded(x), model(x))


def test_convert_once_then_load_without_trust(legacy, tmp_path) -> None:
    path, model, x = legacy
    target = tmp_path / "new.tk"
    with pytest.raises(UnsafeFileError):
        torchkeep.convert_legacy(path, target)
    assert not target.exists()
    torchkeep.convert_legacy(path, target, trusted=True)
    loaded = torchkeep.load_model(target)
    assert torch.equal(loaded(x), model(x))
    assert loaded.heads["lm"].weight is loaded.emb.weight


def test_state_dict_pickle_is_not_a_model(tmp_path) -> None:
    path = os.fspath(tmp_path / "sd.pt")
    torch.save(torch.nn.Linear(2, 2).state_dict(), path)
    with pytest.raises(FormatError, match="not a model.*load_state_dict"):
        torchkeep.load_model(path)
