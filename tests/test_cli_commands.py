"""Each CLI command on files written by the real tools; exit codes and --json shapes."""

from __future__ import annotations

import json
import os

import pytest
import torch
from click.testing import CliRunner

import torchkeep
from interop_files import files, tiny_model
from torchkeep.cli.main import cli

READABLE = ["model.tk", "model.safetensors", "zip.pt", "legacy.pt", "hf", "dcp", "acc",
            "lightning", "run"]  # fmt: skip
FORMATS = {"model.tk": "torchkeep", "model.safetensors": "safetensors", "zip.pt": "torch-zip",
           "legacy.pt": "torch-legacy", "hf": "hf-sharded", "dcp": "dcp", "acc": "accelerate",
           "lightning": "lightning", "run": "torchkeep-run"}  # fmt: skip


@pytest.fixture(scope="module")
def fx(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return files(tmp_path_factory)


def run(*args: str, code: int = 0) -> str:
    result = CliRunner().invoke(cli, list(args))
    assert result.exit_code == code, result.output
    return result.output


@pytest.mark.parametrize("name", READABLE)
def test_inspect_json_every_format(fx: dict, name: str) -> None:
    info = json.loads(run("inspect", fx[name], "--json"))
    assert info["format"] == FORMATS[name]
    assert info["num_params"] == sum(torch.Size(t["shape"]).numel() for t in info["tensors"]) > 0
    assert info["total_bytes"] == sum(t["nbytes"] for t in info["tensors"])
    for row in info["tensors"]:
        assert set(row) == {"name", "dtype", "shape", "nbytes"}
        assert not row["dtype"].startswith("torch.")
    assert isinstance(info["metadata"], dict)


def test_inspect_names_values_and_optimizer(fx: dict) -> None:
    info = json.loads(run("inspect", fx["model.tk"], "--json"))
    names = [t["name"] for t in info["tensors"]]
    assert "model_state.0.weight" in names
    assert info["metadata"] == {"epoch": 3, "metrics.loss": 0.25}
    assert info["checksums"]["status"] == "ok"
    lit = json.loads(run("inspect", fx["lightning"], "--json"))
    assert lit["metadata"]["global_step"] == 2
    assert lit["optimizers"][0]["type"] == "SGD"
    assert lit["optimizers"][0]["hyper_parameters"]["momentum"] == 0.9
    acc = json.loads(run("inspect", fx["acc"], "--json"))
    assert acc["optimizers"][0]["type"] == "AdamW"
    assert not acc["notes"]  # the RNG pickle is read with the restricted NumPy allow-list
    text = run("inspect", fx["model.tk"])
    assert "model_state.0.weight" in text and "float32" in text and "xxh3-64, ok" in text


def test_diff_equal_across_formats_and_different(fx: dict, tmp_path) -> None:
    result = json.loads(run("diff", fx["model.safetensors"], fx["hf"], "--json"))
    assert result["equal"] and len(result["tensors"]) == 4
    other = tmp_path / "other.safetensors"
    sd = {k: v.clone() for k, v in tiny_model().state_dict().items()}
    sd["0.weight"][0, 0] += 1e-3
    sd["extra"] = torch.zeros(1)
    del sd["2.bias"]
    torchkeep.save(sd, other)
    result = json.loads(run("diff", fx["model.safetensors"], str(other), "--json", code=1))
    assert result["only_in_a"] == ["2.bias"] and result["only_in_b"] == ["extra"]
    row = next(t for t in result["tensors"] if t["name"] == "0.weight")
    assert not row["equal"] and row["max_abs_diff"] == pytest.approx(1e-3, rel=1e-3)
    assert row["rel_l2_diff"] > 0
    text = run("diff", fx["model.tk"], fx["zip.pt"])
    assert "equal" in text


def test_diff_tolerance_and_shape_change(tmp_path) -> None:
    a, b, c = (str(tmp_path / n) for n in ("a.tk", "b.tk", "c.tk"))
    torchkeep.save({"w": torch.ones(3)}, a)
    torchkeep.save({"w": torch.ones(3) + 1e-5}, b)
    torchkeep.save({"w": torch.ones(4)}, c)
    run("diff", a, b, code=1)
    run("diff", a, b, "--atol", "1e-4")
    changed = json.loads(run("diff", a, c, "--json", code=1))["changed"]
    assert changed == [{"name": "w", "a": {"dtype": "float32", "shape": [3]},
                        "b": {"dtype": "float32", "shape": [4]}}]  # fmt: skip


@pytest.mark.parametrize("name", READABLE)
def test_verify_ok_every_format(fx: dict, name: str) -> None:
    result = json.loads(run("verify", fx[name], "--json"))
    assert result["ok"] and result["problems"] == []


def test_verify_names_corrupt_tensor(tmp_path) -> None:
    path = tmp_path / "c.tk"
    torchkeep.save({"a": torch.zeros(64), "b": torch.ones(64)}, path)
    with torchkeep.open_file(path) as reader:
        offset = reader.header.data_start + reader.entry("b").begin
    data = bytearray(path.read_bytes())
    data[offset + 5] ^= 0xFF
    path.write_bytes(bytes(data))
    out = run("verify", str(path), code=1)
    assert "'b'" in out and "CORRUPT" in out and "'a'" not in out


def test_verify_run_dir_checks_every_step(fx: dict, tmp_path) -> None:
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(fx["run"], run_dir)
    result = json.loads(run("verify", str(run_dir), "--json"))
    assert result["steps"] == [10, 20, 30]
    state = run_dir / "step-0000000020" / "state.tk"
    data = bytearray(state.read_bytes())
    data[-3] ^= 0xFF
    state.write_bytes(bytes(data))
    out = run("verify", str(run_dir), code=1)
    assert "step 20" in out


def test_ls_of_a_directory_without_steps_says_so(tmp_path) -> None:
    (tmp_path / "model.tk").write_bytes(b"")
    out = run("ls", str(tmp_path))
    assert "no committed steps" in out and "inspect" in out
    assert json.loads(run("ls", str(tmp_path), "--json"))["steps"] == []


def test_ls_and_prune(fx: dict, tmp_path) -> None:
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(fx["run"], run_dir)
    from torchkeep.storage.local import temp_name

    leftover = temp_name(str(run_dir / "step-0000000040"))
    os.mkdir(leftover)
    listing = json.loads(run("ls", str(run_dir), "--json", "--keep-last", "1",
                             "--keep-best", "1", "--monitor", "val_loss"))  # fmt: skip
    kept = {row["step"]: row["kept"] for row in listing["steps"]}
    assert kept == {10: [], 20: ["best"], 30: ["last"]}
    assert listing["steps"][0]["metrics"] == {"val_loss": 0.9}
    assert listing["leftovers"] == [leftover]
    info = json.loads(run("inspect", str(run_dir), "--json"))
    assert info["step"] == 30 and info["steps"] == [10, 20, 30]
    assert any("incomplete save" in note for note in info["notes"])
    text = run("ls", str(run_dir), "--keep-last", "1")
    assert "prunable" in text and "incomplete" in text
    dry = json.loads(run("prune", str(run_dir), "--keep-last", "1", "--keep-best", "1",
                         "--monitor", "val_loss", "--dry-run", "--json"))  # fmt: skip
    assert dry["deleted"] == [10] and os.path.isdir(run_dir / "step-0000000010")
    run("prune", str(run_dir), "--keep-last", "1")
    steps = [row["step"] for row in json.loads(run("ls", str(run_dir), "--json"))["steps"]]
    assert steps == [30]
    run("prune", str(run_dir), code=2)  # no policy given: usage error


def test_scan_safe_files(fx: dict) -> None:
    # The Accelerate folder's NumPy RNG state is covered by readers/safe_globals.py.
    for name in ("zip.pt", "legacy.pt", "model.safetensors", "lightning", "dcp", "acc"):
        result = json.loads(run("scan", fx[name], "--json"))
        assert result["verdict"] == "safe", name


def test_help_has_example_for_every_command() -> None:
    assert "Exit codes" in run("--help")
    for command in ("inspect", "diff", "convert", "verify", "ls", "prune", "scan"):
        assert "Example" in run(command, "--help"), command


def test_diff_nan_and_strict_json(tmp_path) -> None:
    a, b, c = (str(tmp_path / n) for n in ("a.tk", "b.tk", "c.tk"))
    nan = float("nan")
    torchkeep.save({"w": torch.tensor([1.0, nan, 3.0])}, a)
    torchkeep.save({"w": torch.tensor([1.0, nan, 3.0])}, b)
    torchkeep.save({"w": torch.tensor([1.0, 2.0, 3.0])}, c)
    run("diff", a, b)  # NaN in the same places counts as equal
    text = run("diff", a, c, "--json", code=1)
    row = json.loads(text, parse_constant=lambda name: pytest.fail(f"non-JSON {name}"))
    assert row["tensors"][0]["max_abs_diff"] == "inf"


def test_compare_tensors_chunked_matches_direct() -> None:
    from torchkeep.cli import diff as diff_mod

    torch.manual_seed(0)
    x = torch.randn(3 * diff_mod._CHUNK + 7)
    y = x + torch.randn_like(x) * 1e-3
    row = diff_mod.compare_tensors(x, y, 0, 0)
    delta = (x.double() - y.double()).abs()
    assert row["max_abs_diff"] == pytest.approx(float(delta.max()))
    assert row["rel_l2_diff"] == pytest.approx(float(delta.norm() / x.double().norm()))
    assert not row["equal"] and diff_mod.compare_tensors(x, y, 1e-2, 0)["equal"]


def test_ls_uses_the_policy_the_manager_recorded(tmp_path) -> None:
    import torch

    from torchkeep.manager import CheckpointManager

    run_dir = tmp_path / "run"
    losses = {1: 0.5, 2: 0.2, 3: 0.4, 4: 0.6, 5: 0.7}
    with CheckpointManager(run_dir, keep_last=2, keep_best=1, monitor="val_loss") as mgr:
        for step, loss in losses.items():
            mgr.save(step, {"w": torch.full((2,), float(step))}, metrics={"val_loss": loss})
    listing = json.loads(run("ls", str(run_dir), "--json"))
    assert listing["policy"]["keep_last"] == 2 and listing["policy"]["monitor"] == "val_loss"
    assert {row["step"]: row["kept"] for row in listing["steps"]} == {
        2: ["best"],
        4: ["last"],
        5: ["last"],
    }
    explicit = json.loads(run("ls", str(run_dir), "--json", "--keep-last", "1"))
    assert {row["step"]: row["kept"] for row in explicit["steps"]}[4] == []
