"""The CLI on torchkeep sharded checkpoints: inspect, verify, diff, convert (consolidation)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

import torchkeep
import torchkeep.distributed as tkd
from torchkeep.cli.main import cli

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


def run(*args: str, code: int = 0) -> str:
    result = CliRunner().invoke(cli, list(args))
    assert result.exit_code == code, result.output
    return result.output


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Linear(6, 2))


@pytest.fixture
def step(tmp_path) -> str:
    path = str(tmp_path / "step")
    tkd.save({"model": _model(0), "epoch": 3}, path, rng=False)
    return path


def test_inspect_json_shows_whole_tensors(step):
    info = json.loads(run("inspect", step, "--json"))
    assert info["format"] == "torchkeep-sharded"
    text = json.dumps(info)
    assert "modules.model.0.weight" in text
    (shard,) = info["shards"]
    assert shard["rank"] == 0 and shard["status"] == "ok" and shard["chunks"] == 4
    assert shard["values"] and "modules.model.0.weight" in shard["tensors"]
    unchecked = json.loads(run("inspect", step, "--json", "--no-verify"))["shards"][0]
    assert unchecked["status"] == "not checked"


def test_verify_ok_then_corrupt_names_the_file(step):
    assert json.loads(run("verify", step, "--json"))["ok"] is True
    rank0 = os.path.join(step, "rank-00000.safetensors")
    size = os.path.getsize(rank0)
    with open(rank0, "r+b") as f:
        f.seek(size - 1)
        byte = f.read(1)
        f.seek(size - 1)
        f.write(bytes([byte[0] ^ 1]))
    out = json.loads(run("verify", step, "--json", code=1))
    assert out["ok"] is False and "rank-00000.safetensors" in out["problems"][0]


def test_diff_of_two_steps(tmp_path, step):
    other = str(tmp_path / "other")
    tkd.save({"model": _model(1), "epoch": 3}, other, rng=False)
    run("diff", step, step)
    out = run("diff", step, other, code=1)
    assert "modules.model.0.weight" in out


def test_convert_consolidates_to_safetensors_and_hf_shards(tmp_path, step):
    model = _model(0)
    out = str(tmp_path / "model.safetensors")
    run("convert", step, out)
    tensors = load_file(out)
    for name, value in model.state_dict().items():
        assert torch.equal(tensors[f"modules.model.{name}"], value)
    shards = str(tmp_path / "hf")
    run("convert", step, shards, "--max-shard-size", "100B")
    assert len([n for n in os.listdir(shards) if n.endswith(".safetensors")]) > 1
    tk = str(tmp_path / "model.tk")
    run("convert", step, tk)
    loaded = torchkeep.load(tk)
    assert torch.equal(loaded["modules"]["model"]["0.weight"], model[0].weight)
