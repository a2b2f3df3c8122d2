"""Readers and conversions over files written by the real tools; bounded-memory streaming."""

from __future__ import annotations

import json
import os
import weakref

import pytest
import safetensors.torch
import torch
from click.testing import CliRunner

import torchkeep
from interop_files import files, tiny_model
from torchkeep.cli.main import cli
from torchkeep.convert import convert_view, parse_size
from torchkeep.errors import FormatError, UnsafeFileError
from torchkeep.readers.open import open_view
from torchkeep.readers.view import CheckpointView, Ref

SD = {k: v.clone() for k, v in tiny_model().state_dict().items()}


@pytest.fixture(scope="module")
def fx(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return files(tmp_path_factory)


@pytest.mark.parametrize(
    ("name", "prefix"),
    [("model.tk", "model_state."), ("model.safetensors", ""), ("zip.pt", "model_state."),
     ("legacy.pt", "model_state."), ("hf", ""), ("dcp", "model.")],
)  # fmt: skip
def test_views_hold_the_saved_weights(fx: dict, name: str, prefix: str) -> None:
    with open_view(fx[name]) as view:
        for key, tensor in SD.items():
            assert torch.equal(view.get(prefix + key), tensor), (name, key)


def test_torchkeep_load_opens_folders(fx: dict) -> None:
    dcp = torchkeep.load(fx["dcp"])
    assert dcp["step"] == 7 and torch.equal(dcp["model"]["0.weight"], SD["0.weight"])
    hf = torchkeep.load(fx["hf"])
    assert set(hf) == set(SD)
    acc = torchkeep.load(fx["acc"])
    assert set(acc["model"]) == set(SD) and "param_groups" in acc["optimizer"]
    run = torchkeep.load(fx["run"])
    assert torch.equal(run["objects"]["model"]["0.weight"], SD["0.weight"])
    step = torchkeep.load(os.path.join(fx["run"], "step-0000000010"))
    assert torch.equal(step["objects"]["model"]["0.bias"], SD["0.bias"])


def test_accelerate_trusted_reads_rng_state(fx: dict) -> None:
    with open_view(fx["acc"], trusted=True) as view:
        assert not view.notes and "random_states_0" in view.skeleton


def test_dcp_metadata_read_without_pickle_load(fx: dict, monkeypatch) -> None:
    import pickle

    def forbidden(*_a, **_k):
        raise AssertionError("pickle.loads called on untrusted DCP metadata")

    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    with open_view(fx["dcp"]) as view:
        assert view.format == "dcp" and "model.0.weight" in view.refs


def test_hostile_folders(fx: dict, tmp_path) -> None:
    with pytest.raises(UnsafeFileError):
        open_view(fx["evil_dcp"])
    assert not os.path.exists(fx["marker"])
    bad = tmp_path / "hf"
    bad.mkdir()
    (bad / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"w": "../model.safetensors"}})
    )
    with pytest.raises(FormatError, match="outside"):
        open_view(bad)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FormatError, match="not a recognized checkpoint"):
        open_view(empty)


@pytest.mark.parametrize("src", ["lightning", "dcp", "acc", "zip.pt", "hf", "run"])
def test_convert_to_safetensors_loads_with_stock_library(fx: dict, src: str, tmp_path) -> None:
    out = tmp_path / "out.safetensors"
    result = CliRunner().invoke(cli, ["convert", fx[src], str(out)])
    assert result.exit_code == 0, result.output
    loaded = safetensors.torch.load_file(str(out))
    with open_view(fx[src]) as view:
        assert set(loaded) == set(view.refs)
        for name in view.refs:
            assert torch.equal(loaded[name], view.get(name))


def test_convert_sharded_dtype_and_torch(fx: dict, tmp_path) -> None:
    shards = tmp_path / "shards"
    runner = CliRunner()
    args = ["convert", fx["dcp"], str(shards), "--max-shard-size", "20B", "--dtype", "bfloat16"]
    assert runner.invoke(cli, args).exit_code == 0
    index = json.loads((shards / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    merged = {}
    for shard in set(index["weight_map"].values()):
        merged.update(safetensors.torch.load_file(str(shards / shard)))
    assert merged["model.0.weight"].dtype == torch.bfloat16
    assert torch.equal(merged["model.0.weight"], SD["0.weight"].bfloat16())
    pt = tmp_path / "out.pt"
    assert runner.invoke(cli, ["convert", fx["lightning"], str(pt)]).exit_code == 0
    loaded = torch.load(pt, weights_only=True)
    assert loaded["global_step"] == 2 and "net.weight" in loaded["state_dict"]
    assert runner.invoke(cli, ["diff", fx["lightning"], str(pt)]).exit_code == 0


def test_sharded_output_loads_with_huggingface_hub(fx: dict, tmp_path) -> None:
    from huggingface_hub import load_torch_model

    out = tmp_path / "hf_out"
    args = ["convert", fx["model.safetensors"], str(out), "--max-shard-size", "100B"]
    assert CliRunner().invoke(cli, args).exit_code == 0
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    load_torch_model(model, str(out), strict=True)
    assert torch.equal(model[2].weight, SD["2.weight"])


def test_convert_to_torchkeep_keeps_structure(fx: dict, tmp_path) -> None:
    out = tmp_path / "lit.tk"
    assert CliRunner().invoke(cli, ["convert", fx["lightning"], str(out)]).exit_code == 0
    loaded = torchkeep.load(out)
    assert loaded["epoch"] == 0 and loaded["hyper_parameters"] == {"hidden": 3}
    assert torchkeep.verify(out) == []


def test_convert_whole_model_needs_trust(fx: dict, tmp_path) -> None:
    out = tmp_path / "model.tk"
    runner = CliRunner()
    result = runner.invoke(cli, ["convert", fx["whole_model.pth"], str(out)])
    assert result.exit_code == 4 and not out.exists()
    result = runner.invoke(cli, ["convert", fx["whole_model.pth"], str(out), "--trusted"])
    assert result.exit_code == 0, result.output
    from torchkeep.model.api import load_model

    model = load_model(out)
    assert torch.equal(model[0].weight, SD["0.weight"])


class _Counting(CheckpointView):
    """A view whose tensors are created on fetch; tracks how many are alive at once."""

    def __init__(self, n: int) -> None:
        self.alive: weakref.WeakSet = weakref.WeakSet()
        self.peak = 0
        refs = {f"t{i}": Ref(f"t{i}", torch.float32, (256,), self._make(i)) for i in range(n)}
        super().__init__("<memory>", "test", refs)

    def _make(self, i: int):
        def fetch() -> torch.Tensor:
            tensor = torch.full((256,), float(i))
            self.alive.add(tensor)
            self.peak = max(self.peak, len(self.alive))
            return tensor

        return fetch


@pytest.mark.parametrize("dst", ["o.tk", "o.safetensors", "shards"])
def test_convert_streams_one_tensor_at_a_time(tmp_path, dst: str) -> None:
    view = _Counting(20)
    shard = 2048 if dst == "shards" else None
    convert_view(view, str(tmp_path / dst), max_shard_size=shard)
    assert view.peak == 1
    with open_view(tmp_path / dst) as back:
        assert torch.equal(back.get("t7"), torch.full((256,), 7.0))


def test_parse_size() -> None:
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("500MiB") == 500 * 2**20
    assert parse_size("1000") == 1000
    with pytest.raises(Exception, match="not a size"):
        parse_size("lots")
