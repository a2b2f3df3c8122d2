"""export_model / load_exported: the archive, and the pickle scan in front of torch.export.load.

The fresh-process round trip (a process that never imports the model's class) is in
test_model_roundtrip.py, batched with the other fresh-process checks.
"""

from __future__ import annotations

import os
import zipfile

import pytest
import torch
from torch import nn

import torchkeep
from torchkeep.errors import FormatError, TorchkeepError, UnsafeFileError

# A pickle that would run os.system("touch <sentinel>") if it were ever unpickled.
_EVIL = b"\x80\x02cos\nsystem\nX%d\x00\x00\x00%s\x85R."


def evil_pickle(sentinel: str) -> bytes:
    command = f"touch {sentinel}".encode()
    return _EVIL.replace(b"%d\x00\x00\x00", len(command).to_bytes(4, "little")).replace(
        b"%s", command
    )


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    path = tmp_path_factory.mktemp("export") / "m.pt2"
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    x = torch.randn(5, 4)
    program = torchkeep.export_model(model, path, x)  # a single tensor is accepted
    assert model.training  # the caller's mode is restored
    return path, model.eval(), x, program


def test_export_round_trip_in_process(exported) -> None:
    path, model, x, _ = exported
    program = torchkeep.load_exported(path)
    assert torch.allclose(program.module()(x), model(x), atol=1e-6)
    assert torch.allclose(torch.export.load(path).module()(x), model(x), atol=1e-6)


def test_archive_with_a_hostile_pickle_is_refused(exported, tmp_path) -> None:
    path, _, _, _ = exported
    sentinel = tmp_path / "sentinel"
    bad = tmp_path / "bad.pt2"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(bad, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if "sample_inputs" in info.filename:
                data = evil_pickle(os.fspath(sentinel))
            dst.writestr(info, data)
    with pytest.raises(UnsafeFileError, match="os.system") as info:
        torchkeep.load_exported(bad)
    assert "os.system" in info.value.globals
    assert not sentinel.exists()


def test_not_an_archive(tmp_path) -> None:
    torchkeep.save({"w": torch.zeros(1)}, tmp_path / "x.tk")
    with pytest.raises(FormatError, match="not a torch.export archive"):
        torchkeep.load_exported(tmp_path / "x.tk")
    with pytest.raises(TorchkeepError, match="no such file"):
        torchkeep.load_exported(tmp_path / "missing.pt2")


def test_untraceable_model_is_explained(tmp_path) -> None:
    class Branchy(nn.Module):
        def forward(self, x):
            return x.nonzero().sum() if x.sum().item() > 0 else x

    with pytest.raises(TorchkeepError, match="torch.export could not trace Branchy"):
        torchkeep.export_model(Branchy(), tmp_path / "b.pt2", (torch.ones(3),))
    assert not (tmp_path / "b.pt2").exists()


def test_untrusted_load_never_calls_torch_export_load(exported, monkeypatch) -> None:
    """The untrusted path reads the parts itself, every pickle weights-only (no fallback)."""
    path, model, x, program = exported
    calls = []
    monkeypatch.setattr(torch.export, "load", lambda *a, **k: calls.append(a))
    loaded = torchkeep.load_exported(path)
    assert calls == []
    assert torch.allclose(loaded.module()(x), model(x), atol=1e-6)
    assert sorted(loaded.state_dict) == sorted(program.state_dict)
    torchkeep.load_exported(path, trusted=True)
    assert len(calls) == 1


def test_untrusted_load_of_dynamic_shapes_tied_weights_and_constants(tmp_path) -> None:
    from torch.export import Dim

    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(10, 4)
            self.out = nn.Linear(4, 10, bias=False)
            self.out.weight = self.emb.weight
            self.register_buffer("scale", torch.tensor([2.0]))
            self.const = torch.arange(4.0).reshape(2, 2).t()  # a strided tensor constant

        def forward(self, i: torch.Tensor) -> torch.Tensor:
            return self.out(self.emb(i) * self.scale) + self.const.sum()

    model = Tied().eval()
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    path = tmp_path / "tied.pt2"
    torchkeep.export_model(model, path, (ids,), dynamic_shapes={"i": {0: Dim("b", max=64)}})
    loaded = torchkeep.load_exported(path)
    more = torch.tensor([[1, 2, 3]] * 5)
    assert torch.equal(loaded.module()(more), model(more))
    assert loaded.range_constraints.keys() and "const" in loaded.constants
    reference = torch.export.load(path)  # aliasing and keys as torch's own loader has them
    assert sorted(loaded.state_dict) == sorted(reference.state_dict)
    ptrs = {k: v.data_ptr() for k, v in loaded.state_dict.items()}
    ref_ptrs = {k: v.data_ptr() for k, v in reference.state_dict.items()}
    assert (len(set(ptrs.values())), len(ptrs)) == (len(set(ref_ptrs.values())), len(ref_ptrs))


def test_untrusted_load_reads_a_pickled_weight_weights_only(exported, tmp_path) -> None:
    """A weight the config marks ``use_pickle`` (a torch.save zip) loads through weights-only."""
    import io
    import json

    path, model, x, _ = exported
    out = tmp_path / "pickled.pt2"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(out, "w") as dst:
        top = src.namelist()[0].split("/", 1)[0]
        config = json.loads(src.read(f"{top}/data/weights/model_weights_config.json"))
        fqn, meta = next(iter(config["config"].items()))
        meta["use_pickle"] = True
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith("model_weights_config.json"):
                data = json.dumps(config).encode()
            elif info.filename == f"{top}/data/weights/{meta['path_name']}":
                buffer = io.BytesIO()
                torch.save(dict(model.named_parameters())[fqn], buffer)  # as torch pickles it
                data = buffer.getvalue()
            dst.writestr(info, data)
    loaded = torchkeep.load_exported(out)
    assert torch.equal(loaded.state_dict[fqn], model.state_dict()[fqn])
    assert torch.allclose(loaded.module()(x), model(x), atol=1e-6)
