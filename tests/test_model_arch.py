"""Architecture changes between save and load are explained with the load_state_dict table."""

from __future__ import annotations

import sys
import textwrap

import pytest
import torch

import torchkeep
from torchkeep.errors import StateDictMismatchError

V1 = """
import torch
from torch import nn


class Model(nn.Module):
    def __init__(self, n_input_features):
        super().__init__()
        self.linear = nn.Linear(n_input_features, 1)

    def forward(self, x):
        return torch.sigmoid(self.linear(x))


class Sized(nn.Module):
    def __init__(self, n_in, hidden=4):
        super().__init__()
        self.n_in, self.hidden = n_in, hidden
        self.fc = nn.Linear(n_in, hidden)
        self.out = nn.Linear(hidden, 1)

    def forward(self, x):
        return self.out(self.fc(x))
"""

V1 += """

class Counter(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(2, 2)

    def forward(self, x):
        if not hasattr(self, "seen"):
            self.seen = 0
        self.seen += 1
        return self.lin(x) * self.seen
"""

V2 = (
    V1.replace("self.linear = nn.Linear", "self.fc = nn.Linear")
    .replace("self.linear(x)", "self.fc(x)")
    .replace("nn.Linear(n_in, hidden)", "nn.Linear(n_in, 2 * hidden)")
    .replace("nn.Linear(hidden, 1)", "nn.Linear(2 * hidden, 1)")
)


@pytest.fixture
def versions(tmp_path, monkeypatch):
    """Import ``tkarch`` v1, and a function that swaps in v2 (the code changed on disk)."""
    dirs = {}
    for name, source in (("v1", V1), ("v2", V2)):
        dirs[name] = tmp_path / name
        dirs[name].mkdir()
        (dirs[name] / "tkarch.py").write_text(textwrap.dedent(source))
    monkeypatch.syspath_prepend(str(dirs["v1"]))
    sys.modules.pop("tkarch", None)
    import tkarch as v1

    def upgrade():
        sys.modules.pop("tkarch", None)
        sys.path.remove(str(dirs["v1"]))
        monkeypatch.syspath_prepend(str(dirs["v2"]))
        import tkarch as v2

        return v2

    yield v1, upgrade
    sys.modules.pop("tkarch", None)


def test_unchanged_class_loads(versions, tmp_path) -> None:
    v1, _ = versions
    torchkeep.save_model(v1.Sized(3), tmp_path / "m.tk")
    torchkeep.save_model(v1.Model(6), tmp_path / "seed.tk")
    torchkeep.save_model(v1.Counter(), tmp_path / "lazy.tk")  # attribute made by forward
    assert type(torchkeep.load_model(tmp_path / "m.tk")).__name__ == "Sized"
    assert torchkeep.load_model(tmp_path / "lazy.tk")(torch.ones(1, 2)).shape == (1, 2)
    assert type(torchkeep.load_model(tmp_path / "seed.tk")).__name__ == "Model"


def test_renamed_layer_is_explained(versions, tmp_path) -> None:
    v1, upgrade = versions
    path = tmp_path / "seed.tk"
    torchkeep.save_model(v1.Model(n_input_features=6), path)
    v2 = upgrade()
    with pytest.raises(StateDictMismatchError) as info:
        torchkeep.load_model(path)
    report = info.value.report
    assert report.missing == ["fc"] and report.unexpected == ["linear"]
    message = str(info.value)
    assert "missing in checkpoint" in message and "unexpected in checkpoint" in message
    assert "load_state_dict(model" in message and "strict=False" in message
    # The recommended path: build the new model, load what fits.
    fresh = v2.Model(6)
    loaded = torchkeep.load_state_dict(fresh, path, strict=False)
    assert sorted(loaded.unexpected) == ["linear.bias", "linear.weight"]


def test_resized_layer_is_explained(versions, tmp_path, monkeypatch) -> None:
    """Resizes show only through the constructor check, which runs only for trusted files."""
    v1, upgrade = versions
    path = tmp_path / "m.tk"
    model = v1.Sized(3)
    torchkeep.save_model(model, path)
    v2 = upgrade()
    calls = []
    monkeypatch.setattr(v2.Sized, "__init__", _spy(v2.Sized.__init__, calls))
    untrusted = torchkeep.load_model(path)  # structure still fits; nothing of Sized is called
    assert calls == [] and type(untrusted) is v2.Sized
    with pytest.raises(StateDictMismatchError) as info:
        torchkeep.load_model(path, trusted=True)
    assert calls  # the trusted check did build the current class (on the meta device)
    mismatches = {k: (a, b) for k, a, b in info.value.report.shape_mismatches}
    assert mismatches["fc.weight"] == ((4, 3), (8, 3))
    assert "shape mismatch" in str(info.value)
    as_saved = torchkeep.load_model(path, check_fit=False)  # the model exactly as saved
    x = torch.randn(2, 3)
    assert torch.equal(as_saved(x), model.eval()(x))


def _spy(init, calls):
    def spied(self, *args, **kwargs):
        calls.append((args, kwargs))
        init(self, *args, **kwargs)

    return spied


def test_added_layer_found_from_init_source(versions, tmp_path) -> None:
    """A layer the current __init__ always creates but the file lacks is missing, untrusted."""
    v1, upgrade = versions
    path = tmp_path / "m.tk"
    torchkeep.save_model(v1.Sized(3), path)
    v2 = upgrade()  # the class is only parsed, never called
    source = (tmp_path / "v2" / "tkarch.py").read_text()
    (tmp_path / "v2" / "tkarch.py").write_text(
        source.replace("self.out = nn.Linear(2 * hidden, 1)",
                       "self.out = nn.Linear(2 * hidden, 1)\n        self.norm = nn.LayerNorm(1)")
    )  # fmt: skip
    sys.modules.pop("tkarch")
    import tkarch

    assert tkarch.Sized is not v2.Sized
    with pytest.raises(StateDictMismatchError) as info:
        torchkeep.load_model(path)
    assert info.value.report.missing == ["norm"]
