"""``convert`` between every pair of formats, mixed dtypes included (issue 21 item 5)."""

from __future__ import annotations

import os

import pytest
import torch
from click.testing import CliRunner

import torchkeep
from torchkeep.cli.main import cli

EXT = {"tk": "x.tk", "safetensors": "x.safetensors", "pt": "x.pt", "hf": "hf_folder"}


def _mixed_state() -> dict[str, torch.Tensor]:
    """A BatchNorm net's state (int64 counter), plus half, bfloat16, bool and int8 tensors."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    state = dict(net.state_dict())
    state["half"] = torch.randn(5).half()
    state["bf16"] = torch.randn(2, 3).bfloat16()
    state["mask"] = torch.tensor([True, False, True])
    state["q"] = torch.arange(-3, 4, dtype=torch.int8)
    state["empty_i64"] = torch.zeros(0, dtype=torch.int64)
    state["empty_f32"] = torch.zeros(0, 2)
    state["scalar"] = torch.tensor(3.5, dtype=torch.float64)
    return state


def _write(fmt: str, path: str, state: dict) -> None:
    if fmt == "tk":
        torchkeep.save(state, path)
    elif fmt == "pt":
        torch.save(state, path)
    elif fmt == "safetensors":
        from safetensors.torch import save_file

        save_file(state, path)
    else:
        from safetensors.torch import save_file

        os.makedirs(path)
        save_file(state, os.path.join(path, "model.safetensors"))  # then re-sharded below


def _convert(src: str, dst: str, *extra: str) -> None:
    result = CliRunner().invoke(cli, ["convert", src, dst, *extra])
    assert result.exit_code == 0, result.output


def _assert_same(loaded: dict, state: dict) -> None:
    assert set(loaded) == set(state)
    for key, value in state.items():
        got = loaded[key]
        assert got.dtype == value.dtype and got.shape == value.shape, key
        assert torch.equal(got, value), key


def _source(tmp_path, fmt: str, state: dict) -> str:
    if fmt != "hf":
        path = str(tmp_path / f"src.{EXT[fmt]}")
        _write(fmt, path, state)
        return path
    single = str(tmp_path / "single.safetensors")
    _write("safetensors", single, state)
    path = str(tmp_path / "src_hf")
    _convert(single, path, "--max-shard-size", "64")  # several shards
    assert len([n for n in os.listdir(path) if n.endswith(".safetensors")]) > 1
    return path


@pytest.mark.parametrize("dst_fmt", list(EXT))
@pytest.mark.parametrize("src_fmt", list(EXT))
def test_every_format_pair_mixed_dtypes(tmp_path, src_fmt: str, dst_fmt: str) -> None:
    state = _mixed_state()
    src = _source(tmp_path, src_fmt, state)
    dst = str(tmp_path / f"dst.{EXT[dst_fmt]}")
    _convert(src, dst, *(["--max-shard-size", "100"] if dst_fmt == "hf" else []))
    _assert_same(torchkeep.load(dst), state)
    if dst_fmt == "pt":  # plain torch.load, weights only, reads it too
        _assert_same(torch.load(dst, weights_only=True), state)


def test_pt_output_holds_only_each_tensors_bytes(tmp_path) -> None:
    """Tensors mapped from a torchkeep file are written as their own bytes, not the whole file."""
    big = {"a": torch.zeros(200_000), "b": torch.ones(3, dtype=torch.int64)}
    torchkeep.save(big, str(tmp_path / "big.tk"))
    _convert(str(tmp_path / "big.tk"), str(tmp_path / "big.pt"))
    assert os.path.getsize(tmp_path / "big.pt") < 1.2 * 800_000  # not once per tensor
    _assert_same(torch.load(str(tmp_path / "big.pt"), weights_only=True), big)


def test_nested_training_checkpoint_round_trips_through_pt(tmp_path) -> None:
    """Optimizer state (int64 step next to float moments) and a plain epoch survive tk -> pt."""
    net = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3))
    opt = torch.optim.AdamW(net.parameters())
    net(torch.randn(4, 3)).sum().backward()
    opt.step()
    ckpt = {"model": net.state_dict(), "optimizer": opt.state_dict(), "epoch": 3}
    torchkeep.save(ckpt, str(tmp_path / "c.tk"))
    _convert(str(tmp_path / "c.tk"), str(tmp_path / "c.pt"))
    back = torch.load(str(tmp_path / "c.pt"), weights_only=True)
    assert back["epoch"] == 3
    _assert_same(back["model"], ckpt["model"])
    fresh = torch.optim.AdamW(net.parameters())
    fresh.load_state_dict(back["optimizer"])  # what resuming does
    assert fresh.state_dict()["state"][0]["step"] == opt.state_dict()["state"][0]["step"]


def test_tied_entries_converted_to_pt_stay_equal(tmp_path) -> None:
    emb = torch.randn(5, 2)
    torchkeep.save({"embed": emb, "head": emb, "n": torch.tensor(1)}, str(tmp_path / "t.tk"))
    _convert(str(tmp_path / "t.tk"), str(tmp_path / "t.pt"))
    back = torch.load(str(tmp_path / "t.pt"), weights_only=True)
    assert torch.equal(back["embed"], emb) and torch.equal(back["head"], emb)


def test_transformers_sharded_folder_to_every_format(tmp_path) -> None:
    """A real ``save_pretrained`` sharded folder converts to each format and back unchanged."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(
        n_layer=2, n_head=2, n_embd=8, vocab_size=32, n_positions=16, bos_token_id=0,
        eos_token_id=0,
    )  # fmt: skip
    model = transformers.GPT2LMHeadModel(cfg).to(torch.bfloat16)
    folder = str(tmp_path / "hf")
    model.save_pretrained(folder, max_shard_size="2KB")
    assert os.path.exists(os.path.join(folder, "model.safetensors.index.json"))
    expected = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    for name in ("m.pt", "m.tk", "m.safetensors"):
        _convert(folder, str(tmp_path / name))
        _assert_same(torchkeep.load(str(tmp_path / name)), expected)
    _convert(str(tmp_path / "m.pt"), str(tmp_path / "again"), "--max-shard-size", "3KB")
    cfg.save_pretrained(str(tmp_path / "again"))  # the weights are ours, the config is theirs
    back = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path / "again"))
    for key, value in expected.items():
        assert torch.equal(back.state_dict()[key].to(value.dtype), value), key
