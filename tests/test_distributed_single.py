"""torchkeep.distributed in one process (no process group): plain dcp.save/dcp.load with
torchkeep's storage, no pickle anywhere, and hostile metadata or shard files -> FormatError."""

from __future__ import annotations

import io
import json
import os
import pickle

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors import safe_open
from torch.distributed.checkpoint.api import CheckpointException

import torchkeep.distributed as tkd
import torchkeep.errors as tkd_errors
from torchkeep.errors import CorruptionError, FormatError, StorageError, UnsafeFileError

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Linear(6, 2))


@pytest.fixture
def saved(tmp_path) -> tuple[str, dict]:
    model = _model(0)
    state = {"model": model.state_dict(), "step": 7, "extra": {"names": ["a", "b"], "t": (1.5,)}}
    path = str(tmp_path / "ck")
    dcp.save(state, storage_writer=tkd.TorchkeepWriter(path))
    return path, state


def _empty_state() -> dict:
    return {"model": _model(1).state_dict(), "step": 0, "extra": {"names": None, "t": None}}


def test_plain_dcp_roundtrip_default_and_torchkeep_planner(saved):
    path, state = saved
    for planner in (None, tkd.TorchkeepLoadPlanner()):
        target = _empty_state()
        dcp.load(target, storage_reader=tkd.TorchkeepReader(path), planner=planner)
        assert target["step"] == 7 and target["extra"] == {"names": ["a", "b"], "t": (1.5,)}
        for k, v in state["model"].items():
            assert torch.equal(target["model"][k], v)


def test_files_open_with_stock_safetensors_and_metadata_is_json(saved):
    path, state = saved
    assert sorted(os.listdir(path)) == ["checkpoint.json", "rank-00000.safetensors"]
    with open(os.path.join(path, "checkpoint.json")) as f:
        doc = json.load(f)
    assert doc["world_size"] == 1 and "model.0.weight" in doc["tensors"]
    with safe_open(os.path.join(path, "rank-00000.safetensors"), "pt") as f:
        assert torch.equal(f.get_tensor("t.model.0.weight"), state["model"]["0.weight"])


def test_a_load_never_unpickles(saved, monkeypatch):
    path, _ = saved

    def refuse(*args, **kwargs):
        raise AssertionError("something was unpickled")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    for planner in (None, tkd.TorchkeepLoadPlanner()):
        target = _empty_state()
        dcp.load(target, storage_reader=tkd.TorchkeepReader(path), planner=planner)
        assert target["extra"]["names"] == ["a", "b"]


def test_torchkeep_planner_refuses_pickled_bytes():
    planner = tkd.TorchkeepLoadPlanner()
    item = type("Item", (), {"dest_index": type("I", (), {"fqn": "x"})()})()
    with pytest.raises(UnsafeFileError, match="never unpickles"):
        planner.load_bytes(item, io.BytesIO(pickle.dumps(1)))


def test_committed_checkpoints_are_immutable(saved):
    path, state = saved
    with pytest.raises(CheckpointException) as info:
        dcp.save(state, storage_writer=tkd.TorchkeepWriter(path))
    assert isinstance(info.value.failures[0][0], StorageError)  # DCP wraps it per rank


def test_helpers_single_process_roundtrip(tmp_path):
    model = _model(0)
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    tkd.save({"model": model, "optim": opt, "epoch": 4}, tmp_path / "s")
    fresh = _model(5)
    fresh_opt = torch.optim.Adam(fresh.parameters())
    state = {"model": fresh, "optim": fresh_opt, "epoch": 0}
    tkd.load(state, tmp_path / "s")
    assert state["epoch"] == 4
    for a, b in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(a, b)
    saved_state, loaded_state = opt.state_dict()["state"], fresh_opt.state_dict()["state"]
    for i in saved_state:
        assert torch.equal(saved_state[i]["exp_avg_sq"], loaded_state[i]["exp_avg_sq"])


# -- hostile metadata and shard files ------------------------------------------------------
def _edit(path: str, change) -> None:
    meta = os.path.join(path, "checkpoint.json")
    with open(meta) as f:
        doc = json.load(f)
    change(doc)
    with open(meta, "w") as f:
        json.dump(doc, f)


def _chunks(*boxes):
    return [
        {"offsets": list(o), "sizes": list(s), "file": 0, "name": "model.0.weight"}
        for o, s in boxes
    ]


HOSTILE = {
    "wrong global shape": (
        lambda d: d["tensors"]["model.0.weight"].update(shape=[6, 5]),
        "cover 24 of 30",
    ),
    "chunk outside the tensor": (
        lambda d: d["tensors"]["model.0.weight"].update(chunks=_chunks(((4, 0), (6, 4)))),
        "outside the global shape",
    ),
    "overlapping chunks": (
        lambda d: d["tensors"]["model.0.weight"].update(
            chunks=_chunks(((0, 0), (4, 4)), ((2, 0), (4, 4)))
        ),
        "overlap",
    ),
    "missing chunk": (
        lambda d: d["tensors"]["model.0.weight"].update(chunks=_chunks(((0, 0), (3, 4)))),
        "a shard is missing",
    ),
    "missing shard file": (
        lambda d: d.update(
            world_size=2, files=["rank-00000.safetensors", "rank-00001.safetensors"]
        ),
        "rank-00001.safetensors is missing",
    ),
    "path in a file name": (
        lambda d: d.update(files=["../../etc/passwd"]),
        "expected 'rank-00000.safetensors'",
    ),
    "chunk names a rank that does not exist": (
        lambda d: d["tensors"]["model.0.bias"]["chunks"][0].update(file=3),
        "not a rank below world_size",
    ),
    "negative size": (
        lambda d: d["tensors"]["model.0.bias"].update(shape=[-6]),
        "non-negative",
    ),
    "unknown dtype": (
        lambda d: d["tensors"]["model.0.bias"].update(dtype="nn"),
        "unknown torch dtype",
    ),
    "NaN where a number belongs": (
        lambda d: d.update(world_size=float("nan")),
        "not valid JSON",
    ),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_metadata_raises_format_error_naming_the_file(saved, case):
    path, _ = saved
    change, expected = HOSTILE[case]
    _edit(path, change)
    meta = os.path.join(path, "checkpoint.json")
    with pytest.raises(FormatError, match=expected) as info:
        tkd.TorchkeepReader(path).read_metadata()
    assert meta in str(info.value)
    with pytest.raises(FormatError):  # the helper validates before DCP sees anything
        tkd.load({"model": _model(1)}, path)


@pytest.mark.parametrize("payload", ["pickle", "torch.save"])
def test_pickle_where_json_belongs_is_refused_unread(saved, payload, monkeypatch):
    path, _ = saved
    meta = os.path.join(path, "checkpoint.json")
    with open(meta, "wb") as f:
        if payload == "pickle":
            f.write(pickle.dumps({"state_dict_metadata": {}}))
        else:
            torch.save({"x": 1}, f)
    monkeypatch.setattr(pickle, "loads", None)  # any attempt to unpickle would crash loudly
    with pytest.raises(FormatError, match="pickle") as info:
        tkd.TorchkeepReader(path).read_metadata()
    assert meta in str(info.value)


def test_stock_dcp_folder_is_named_as_such(tmp_path):
    dcp.save({"x": torch.zeros(2)}, storage_writer=dcp.FileSystemWriter(str(tmp_path)))
    with pytest.raises(FormatError, match="stock DCP checkpoint"):
        tkd.TorchkeepReader(str(tmp_path)).read_metadata()


def _rank0(path: str) -> str:
    return os.path.join(path, "rank-00000.safetensors")


@pytest.fixture
def helper_saved(tmp_path) -> str:
    path = str(tmp_path / "helper")
    tkd.save({"model": _model(0)}, path, rng=False)
    return path


W, B = "modules.model.0.weight", "modules.model.0.bias"


def test_chunk_stored_with_another_shape_is_a_format_error(helper_saved):
    path = helper_saved
    # point the weight's chunk at the bias entry (6 elements where 24 were promised)
    _edit(path, lambda d: d["tensors"][W]["chunks"][0].update(name=B))
    with pytest.raises(FormatError, match="rank-00000.safetensors") as info:
        tkd.load({"model": _model(1)}, path, rng=False)
    assert B in str(info.value)


def test_chunk_missing_from_its_file_is_a_format_error(helper_saved):
    path = helper_saved
    _edit(path, lambda d: d["tensors"][W]["chunks"][0].update(name="nope"))
    with pytest.raises(FormatError, match="has no tensor chunk named 'nope'"):
        tkd.load({"model": _model(1)}, path, rng=False)


def test_flipped_byte_in_a_shard_is_caught_by_its_checksum(helper_saved):
    path = helper_saved
    size = os.path.getsize(_rank0(path))
    with open(_rank0(path), "r+b") as f:
        f.seek(size - 3)
        byte = f.read(1)
        f.seek(size - 3)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(CorruptionError, match="rank-00000.safetensors"):
        tkd.load({"model": _model(1)}, path, rng=False)


def test_describe_and_verify(helper_saved):
    path = helper_saved
    info = tkd.describe(path)
    assert info["world_size"] == 1 and info["files"][0]["name"] == "rank-00000.safetensors"
    assert info["tensors"][W]["shape"] == [6, 4]
    assert info["tensors"][W]["chunks"] == [{"offsets": [0, 0], "sizes": [6, 4], "rank": 0}]
    assert tkd.verify(path) == []
    size = os.path.getsize(_rank0(path))
    with open(_rank0(path), "r+b") as f:  # the last bytes belong to the last tensor's data
        f.seek(size - 1)
        byte = f.read(1)
        f.seek(size - 1)
        f.write(bytes([byte[0] ^ 1]))
    problems = tkd.verify(path)
    assert len(problems) == 1 and "rank-00000.safetensors" in problems[0]
    assert "corrupt" in problems[0]


def test_verify_reports_hostile_metadata(helper_saved):
    _edit(helper_saved, lambda d: d["tensors"][W].update(shape=[6, 5]))
    (problem,) = tkd.verify(helper_saved)
    assert "checkpoint.json" in problem and "a shard is missing" in problem


def test_leftover_temp_of_a_dead_save_is_swept_and_never_read(tmp_path):
    from torchkeep.storage.local import temp_name

    target = str(tmp_path / "ck")
    leftover = temp_name(target).rsplit(".", 2)
    dead = f"{leftover[0]}.999999999.{leftover[2]}"  # same host, a pid that cannot be alive
    os.mkdir(dead)
    with pytest.raises(FormatError):
        tkd.TorchkeepReader(dead).read_metadata()
    dcp.save({"x": torch.ones(2)}, storage_writer=tkd.TorchkeepWriter(target))
    assert not os.path.exists(dead)
    assert sorted(os.listdir(tmp_path)) == ["ck"]


def test_steps_keep_last_latest_and_fallback(tmp_path):
    run = tmp_path / "run"
    model = _model(0)
    for step in (10, 20, 30):
        with torch.no_grad():
            model[0].bias.fill_(step)
        tkd.save_step(run, step, {"model": model, "step": step}, keep_last=2)
    assert tkd.steps(run) == [20, 30] and tkd.latest_step(run) == 30
    os.mkdir(run / ".step-0000000040.tk-tmp.h.1.ab")  # an interrupted save is never listed
    assert tkd.latest_step(run) == 30
    fresh = {"model": _model(1), "step": 0}
    assert tkd.restore(run, fresh) == 30 and fresh["step"] == 30
    rank0 = os.path.join(tkd.step_path(run, 30), "rank-00000.safetensors")
    with open(rank0, "r+b") as f:
        f.seek(os.path.getsize(rank0) - 1)
        f.write(b"\x7f")
    with pytest.raises(CorruptionError):
        tkd.restore(run, {"model": _model(1), "step": 0})
    fresh = {"model": _model(1), "step": 0}
    with pytest.warns(UserWarning, match="step 30 could not be restored"):
        assert tkd.restore(run, fresh, fallback=True) == 20
    assert fresh["step"] == 20 and torch.all(fresh["model"][0].bias == 20)
    with pytest.raises(tkd_errors.CheckpointNotFoundError):
        tkd.restore(run, fresh, step=99)


def test_links_inside_a_checkpoint_are_refused(helper_saved, tmp_path):
    path = helper_saved
    meta = os.path.join(path, "checkpoint.json")
    outside = tmp_path / "outside.json"
    os.replace(meta, outside)
    os.symlink(outside, meta)
    with pytest.raises(FormatError, match="symbolic link"):
        tkd.TorchkeepReader(path).read_metadata()
    os.remove(meta)
    os.replace(outside, meta)
    os.replace(_rank0(path), tmp_path / "rank0")
    os.symlink(tmp_path / "rank0", _rank0(path))
    with pytest.raises(FormatError, match="symlinks are refused"):
        tkd.load({"model": _model(1)}, path, rng=False)


def test_fifo_in_place_of_the_metadata_does_not_block(helper_saved):
    meta = os.path.join(helper_saved, "checkpoint.json")
    os.remove(meta)
    os.mkfifo(meta)
    with pytest.raises(FormatError, match="not a regular file"):
        tkd.TorchkeepReader(helper_saved).read_metadata()
