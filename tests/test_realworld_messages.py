"""CLI verdicts and messages users meet (issue 21 items 12 and 13): verify of a missing file,
diff of a whole model against its own conversion, refusal wording per tensor kind, shortened
paths, and key columns that are never cut to look alike."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

import torchkeep
from torchkeep.cli.main import cli
from torchkeep.errors import UnsupportedValueError


class WholeNet(torch.nn.Module):
    """A user's model class, pickled whole with ``torch.save(model)``."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(3, 2)
        self.bn = torch.nn.BatchNorm1d(2)
        self.blocks = torch.nn.ModuleList([torch.nn.Linear(2, 2) for _ in range(2)])


def _run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, list(args))
    assert "Traceback" not in result.output
    return result.exit_code, result.output


# -- item 12: verify and diff ----------------------------------------------------------------
@pytest.mark.parametrize("json_flag", [[], ["--json"]])
def test_verify_missing_is_unreadable(tmp_path, json_flag: list) -> None:
    code, output = _run("verify", str(tmp_path / "missing.tk"), *json_flag)
    assert code == 3 and "CORRUPT" not in output
    assert output.strip().startswith("error: ") and "no such file" in output
    (tmp_path / "notes.txt").write_text("hello, not a checkpoint")
    code, output = _run("verify", str(tmp_path / "notes.txt"), *json_flag)
    assert code == 3 and "not a recognized checkpoint" in output


def test_verify_damaged_file_is_still_corrupt(tmp_path) -> None:
    path = tmp_path / "m.tk"
    torchkeep.save({"w": torch.ones(100)}, str(path))
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    code, output = _run("verify", str(path))
    assert code == 1 and "CORRUPT" in output


def test_verify_refused_pickle_exit_4(tmp_path) -> None:
    torch.save(WholeNet(), str(tmp_path / "whole.pth"))
    code, output = _run("verify", str(tmp_path / "whole.pth"))
    assert code == 4 and "--trusted" in output


def _whole_and_converted(tmp_path, model: torch.nn.Module) -> tuple[str, str]:
    pth, tk = str(tmp_path / "model.pth"), str(tmp_path / "converted.tk")
    torch.save(model, pth)
    code, output = _run("convert", pth, tk, "--trusted")
    assert code == 0, output
    return pth, tk


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_diff_whole_model_and_its_conversion_equal(tmp_path, mode: str) -> None:
    model = WholeNet()
    getattr(model, mode)()
    pth, tk = _whole_and_converted(tmp_path, model)
    code, output = _run("diff", pth, tk, "--trusted")
    assert code == 0, output
    assert "whole model (pickled nn.Module)" in output and "torchkeep model file" in output
    assert "the same 6 modules" in output and ": equal" in output
    result = json.loads(_run("diff", pth, tk, "--trusted", "--json")[1])
    assert result["equal"] and result["structure"] == {
        "compared": True, "modules": 6, "differences": []
    }  # fmt: skip
    assert not any(result["values"].values())


def test_diff_whole_model_names_structure_and_weight_differences(tmp_path) -> None:
    pth, tk = _whole_and_converted(tmp_path, WholeNet())
    other = WholeNet()
    other.blocks[1] = torch.nn.Linear(2, 2, bias=True)
    other.eval()
    with torch.no_grad():
        other.fc.weight.add_(1)
    torch.save(other, str(tmp_path / "other.pth"))
    code, output = _run("diff", str(tmp_path / "other.pth"), tk, "--trusted")
    assert code == 1
    assert "~ structure" in output and "eval" in output and "training" in output
    assert "fc.weight" in output
    swapped = WholeNet()
    swapped.bn = torch.nn.LayerNorm(2)  # same tensor names, different class
    torch.save(swapped, str(tmp_path / "swapped.pth"))
    result = json.loads(_run("diff", str(tmp_path / "swapped.pth"), tk, "--trusted", "--json")[1])
    assert not result["equal"]
    assert any("LayerNorm" in d and "BatchNorm1d" in d for d in result["structure"]["differences"])


def test_diff_whole_model_against_plain_weights_says_what_differs_in_kind(tmp_path) -> None:
    model = WholeNet()
    pth, tk = _whole_and_converted(tmp_path, model)
    torchkeep.save(model.state_dict(), str(tmp_path / "weights.tk"))
    code, output = _run("diff", tk, str(tmp_path / "weights.tk"))
    assert code == 0, output
    assert "A is a whole model, B holds only tensors and values" in output


# -- item 13: messages ---------------------------------------------------------------------------
def _refusal(value) -> str:
    with pytest.raises(UnsupportedValueError) as info:
        torchkeep.save({"layer": {"w": value}}, "/nonexistent/never-written.tk")
    return str(info.value)


def test_refusals_name_each_kind() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        coo = torch.eye(3).to_sparse()
        csr = torch.eye(3).to_sparse_csr()
        quant = torch.quantize_per_tensor(torch.ones(3), 0.1, 0, torch.qint8)
        strided_nested = torch.nested.nested_tensor([torch.ones(2), torch.ones(3)])
        jagged = torch.nested.nested_tensor([torch.ones(2), torch.ones(3)], layout=torch.jagged)
    text = _refusal(coo)
    assert text.startswith("layer.w: sparse tensors (torch.sparse_coo)") and "indices()" in text
    assert "crow_indices()" in _refusal(csr)
    text = _refusal(quant)
    assert "quantized tensors (torch.qint8)" in text and "strided" not in text
    assert "dequantize()" in text
    text = _refusal(torch.empty(2, device="meta"))
    assert "meta device" in text and "strided" not in text and "quantized" not in text
    for nested in (strided_nested, jagged):
        text = _refusal(nested)  # the strided one used to escape as a RuntimeError from torch
        assert "nested tensors cannot be saved" in text and "DTensor" not in text


def test_refusal_from_async_save_too(tmp_path) -> None:
    with pytest.raises(UnsupportedValueError, match="meta device"):
        torchkeep.save_async({"w": torch.empty(2, device="meta")}, str(tmp_path / "a.tk"))


def test_depth_limit_error_shortens_the_path() -> None:
    root = node = {}
    for i in range(300):
        node[f"layer_{i}"] = {}
        node = node[f"layer_{i}"]
    with pytest.raises(UnsupportedValueError) as info:
        torchkeep.save(root, "/nonexistent/never-written.tk")
    text = str(info.value)
    assert len(text) < 300 and " ... " in text
    assert text.startswith("layer_0.layer_1.") and "characters" in text
    assert "nesting deeper than" in text


def _long_keys() -> dict[str, torch.Tensor]:
    stem = "model.encoder.layers.0.attention.self_attention.query_key_value_projection"
    return {f"{stem}.{suffix}": torch.ones(1) for suffix in ("weight", "bias", "scale")}


def _table_names(output: str) -> list[str]:
    return [line for line in output.splitlines() if "float32" in line and "[1]" in line]


@pytest.mark.parametrize("as_file", ["tk", "safetensors"])
def test_inspect_piped_never_cuts_keys_to_look_alike(tmp_path, as_file: str) -> None:
    state = _long_keys()
    path = str(tmp_path / f"m.{as_file}")
    if as_file == "tk":
        torchkeep.save(state, path)
    else:
        save_file(state, path)
    code, output = _run("inspect", path)  # CliRunner: stdout is not a terminal
    assert code == 0
    assert "…" not in output
    for key in state:
        assert key in output
    rows = _table_names(output)
    assert len(rows) == 3 and len(set(rows)) == 3


def test_inspect_values_keys_not_cut(tmp_path) -> None:
    stem = "hyper_parameters.optimizer_config.scheduler.warmup"
    obj = {"w": torch.ones(1), "hyper_parameters": {"optimizer_config": {"scheduler": {
        "warmup_steps": 10, "warmup_ratio": 0.5, "warmup_start": 1e-6}}}}  # fmt: skip
    path = str(tmp_path / "m.tk")
    torchkeep.save(obj, path)
    code, output = _run("inspect", path)
    assert code == 0 and "…" not in output
    for suffix in ("_steps", "_ratio", "_start"):
        assert stem + suffix in output


def test_inspect_and_diff_show_file_text_literally(tmp_path) -> None:
    names = {"[red]evil[/red]": torch.ones(1), "a\x1b[31mb": torch.ones(1)}
    torchkeep.save(names, str(tmp_path / "a.tk"))
    code, output = _run("inspect", str(tmp_path / "a.tk"))
    assert code == 0 and "[red]evil[/red]" in output
    assert "\x1b" not in output and "a\\x1b[31mb" in output
    torchkeep.save({"[bold]x": torch.ones(1)}, str(tmp_path / "b.tk"))
    code, output = _run("diff", str(tmp_path / "a.tk"), str(tmp_path / "b.tk"))
    assert code == 1 and "[red]evil[/red]" in output and "[bold]x" in output
    assert "\x1b" not in output
