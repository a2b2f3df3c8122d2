"""A run directory or folder someone else prepared cannot make torchkeep touch anything outside
it, nor block it (issue 18, findings 4 and 7).

Planted symbolic links (lock, state file, meta.json, step directory, temporaries, shards), FIFOs
and devices where a regular file is expected, names with path separators in an index, and
hostile ``meta.json`` values, through the manager, ``load``, retention and the CLI.
"""

from __future__ import annotations

import json
import os
import socket

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file
from torch import nn

import torchkeep
from torchkeep import retention
from torchkeep.cli.main import cli
from torchkeep.errors import UnsafePathError
from torchkeep.storage.lock import LOCK_NAME

SECRET = b"precious user data\n"


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Linear(3, 2)


def _run(tmp_path, steps=(1, 2)) -> str:
    run = str(tmp_path / "run")
    with torchkeep.CheckpointManager(run) as mgr:
        for step in steps:
            mgr.save(step, {"model": _model(step)}, metrics={"loss": 1.0 / step})
    return run


def _victim(tmp_path) -> str:
    victim = tmp_path / "victim.txt"
    victim.write_bytes(SECRET)
    return str(victim)


def _step(run: str, step: int) -> str:
    return os.path.join(run, f"step-{step:010d}")


# -- the writer lock ---------------------------------------------------------------------------
@pytest.mark.parametrize("entry", ["manager save", "prune api", "prune cli"])
def test_symlinked_lock_never_truncates_its_target(tmp_path, entry) -> None:
    run = _run(tmp_path, steps=(1, 2, 3))
    victim = _victim(tmp_path)
    os.unlink(os.path.join(run, LOCK_NAME))
    os.symlink(victim, os.path.join(run, LOCK_NAME))
    if entry == "manager save":
        with torchkeep.CheckpointManager(run) as mgr, pytest.raises(UnsafePathError, match="link"):
            mgr.save(4, {"model": _model()})
    elif entry == "prune api":
        with pytest.raises(UnsafePathError):
            retention.prune(run, keep_last=1)
    else:
        result = CliRunner().invoke(cli, ["prune", run, "--keep-last", "1"])
        assert result.exit_code == 3 and "symbolic link" in result.output, result.output
    with open(victim, "rb") as handle:
        assert handle.read() == SECRET
    assert len(torchkeep.CheckpointManager(run).steps()) == 3  # nothing was pruned either


def test_dangling_lock_link_creates_nothing(tmp_path) -> None:
    run = _run(tmp_path, steps=(1,))
    os.unlink(os.path.join(run, LOCK_NAME))
    target = tmp_path / "created-by-torchkeep"
    os.symlink(str(target), os.path.join(run, LOCK_NAME))
    with torchkeep.CheckpointManager(run) as mgr, pytest.raises(UnsafePathError):
        mgr.save(2, {"model": _model()})
    assert not target.exists()


def test_fifo_lock_does_not_hang(tmp_path) -> None:
    run = _run(tmp_path, steps=(1,))
    os.unlink(os.path.join(run, LOCK_NAME))
    os.mkfifo(os.path.join(run, LOCK_NAME))
    with torchkeep.CheckpointManager(run) as mgr, pytest.raises(UnsafePathError, match="FIFO"):
        mgr.save(2, {"model": _model()})


# -- files inside a step -----------------------------------------------------------------------
def _plant_state(run: str, kind: str, tmp_path) -> None:
    """Replace the newest step's state.tk by a link to an outside checkpoint, or a FIFO."""
    state = os.path.join(_step(run, 2), "state.tk")
    outside = tmp_path / "outside.tk"
    torchkeep.save_checkpoint(outside, {"model": _model(99)})
    os.unlink(state)
    if kind == "symlink":
        os.symlink(str(outside), state)
    elif kind == "fifo":
        os.mkfifo(state)
    else:
        os.symlink("/dev/zero", state)


@pytest.mark.parametrize("kind", ["symlink", "fifo", "device"])
def test_planted_state_file_is_refused_everywhere(tmp_path, kind) -> None:
    run = _run(tmp_path)
    _plant_state(run, kind, tmp_path)
    with torchkeep.CheckpointManager(run, rng=False) as mgr, pytest.raises(UnsafePathError):
        mgr.restore({"model": _model()})
    with pytest.raises(UnsafePathError):
        torchkeep.load(run)
    for args in (["inspect", run], ["verify", run]):
        result = CliRunner().invoke(cli, args)
        assert result.exit_code in (1, 3), (args, result.output)
        assert "Traceback" not in result.output


def test_fallback_skips_a_planted_step_and_restores_the_previous_one(tmp_path) -> None:
    run = _run(tmp_path)
    _plant_state(run, "symlink", tmp_path)
    live = {"model": _model(7)}
    with torchkeep.CheckpointManager(run, rng=False) as mgr, pytest.warns(UserWarning):
        assert mgr.restore(live, fallback=True) == 1
    assert torch.equal(live["model"].weight, _model(1).weight)


def test_symlinked_meta_is_not_followed(tmp_path) -> None:
    run = _run(tmp_path)
    meta = os.path.join(_step(run, 2), "meta.json")
    outside = tmp_path / "outside-meta.json"
    outside.write_text(json.dumps({"metrics": {"stolen": 1.0}}))
    os.unlink(meta)
    os.symlink(str(outside), meta)
    steps = torchkeep.CheckpointManager(run).steps()
    assert [s.step for s in steps] == [1, 2] and "stolen" not in steps[-1].metrics


def test_step_directory_link_is_not_a_step(tmp_path) -> None:
    run = _run(tmp_path, steps=(1,))
    elsewhere = _run(tmp_path / "other", steps=(5,))
    os.symlink(_step(elsewhere, 5), _step(run, 5))
    assert [s.step for s in torchkeep.CheckpointManager(run).steps()] == [1]
    assert CliRunner().invoke(cli, ["prune", run, "--keep-last", "1"]).exit_code == 0
    assert os.path.isdir(_step(elsewhere, 5))  # retention never deletes through the link


def test_sweeping_a_linked_temporary_keeps_the_target(tmp_path) -> None:
    run = _run(tmp_path, steps=(1,))
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "data").write_bytes(SECRET)
    host = "".join(c if c.isalnum() or c in "_-" else "_" for c in socket.gethostname())
    dead_pid = 2**22 + 12345  # above pid_max defaults: no such process
    temp = os.path.join(run, f".step-0000000009.tk-tmp.{host}.{dead_pid}.abcd1234")
    os.symlink(str(precious), temp)
    torchkeep.CheckpointManager(run).close()  # opening sweeps dead writers' temporaries
    assert not os.path.lexists(temp)
    assert (precious / "data").read_bytes() == SECRET


# -- foreign folders (Hugging Face sharded) ----------------------------------------------------
def _sharded(folder, shard_target=None, index_name="model-00001-of-00001.safetensors") -> str:
    os.makedirs(folder, exist_ok=True)
    index = {"metadata": {}, "weight_map": {"w": index_name}}
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as handle:
        json.dump(index, handle)
    if shard_target is None:
        save_file({"w": torch.ones(2)}, os.path.join(folder, "model-00001-of-00001.safetensors"))
    return str(folder)


def test_shard_link_outside_the_folder_is_refused(tmp_path) -> None:
    outside = tmp_path / "outside.safetensors"
    save_file({"w": torch.ones(2)}, str(outside))
    folder = _sharded(tmp_path / "hf", shard_target=outside)
    os.symlink(str(outside), os.path.join(folder, "model-00001-of-00001.safetensors"))
    with pytest.raises(UnsafePathError, match="outside the folder"):
        torchkeep.load(folder)
    result = CliRunner().invoke(cli, ["inspect", folder])
    assert result.exit_code == 3 and "outside the folder" in result.output


@pytest.mark.parametrize("name", ["../outside.safetensors", "/etc/passwd", "a/../../x", ".."])
def test_index_names_outside_are_refused(tmp_path, name) -> None:
    folder = _sharded(tmp_path / "hf", index_name=name)
    with pytest.raises(UnsafePathError):
        torchkeep.load(folder)


def test_hugging_face_cache_links_still_load(tmp_path) -> None:
    repo = tmp_path / "models--org--tiny"
    blob = repo / "blobs" / "0123abcd"
    blob.parent.mkdir(parents=True)
    save_file({"w": torch.arange(3.0)}, str(blob))
    snap = repo / "snapshots" / "rev1"
    _sharded(snap, shard_target=blob)
    os.symlink("../../blobs/0123abcd", snap / "model-00001-of-00001.safetensors")
    assert torch.equal(torchkeep.load(str(snap))["w"], torch.arange(3.0))


def test_links_inside_the_folder_still_load(tmp_path) -> None:
    folder = tmp_path / "hf"
    folder.mkdir()
    save_file({"w": torch.ones(2)}, str(folder / "real.safetensors"))
    _sharded(folder, shard_target=folder / "real.safetensors")
    os.symlink("real.safetensors", folder / "model-00001-of-00001.safetensors")
    assert torch.equal(torchkeep.load(str(folder))["w"], torch.ones(2))


# -- hostile meta.json values ----------------------------------------------------------------
HOSTILE_META = {
    "huge time": {"time": int("9" * 400)},
    "huge metric": {"metrics": {"loss": int("9" * 400)}},
    "nested metric": {"metrics": {"loss": [[1.0]], "acc": {"x": 1}}},
    "metrics not a dict": {"metrics": [1, 2, 3]},
    "huge keep_last": {"policy": {"keep_last": int("9" * 400), "keep_best": None,
                                  "monitor": None, "mode": "min", "keep_every": None}},
    "policy garbage": {"policy": {"keep_last": "all"}},
    "negative time": {"time": -5},
    "nan time": {"time": float("nan")},
    "long metric name": {"metrics": {"x" * 10_000: 1.0}},
}  # fmt: skip


def _write_meta(step_dir: str, extra: dict) -> None:
    path = os.path.join(step_dir, "meta.json")
    with open(path) as handle:
        meta = json.load(handle)
    meta.update(extra)
    with open(path, "w") as handle:
        handle.write(json.dumps(meta))


@pytest.mark.parametrize("case", sorted(HOSTILE_META))
def test_hostile_meta_is_reported_per_step_and_blocks_nothing(tmp_path, case) -> None:
    run = _run(tmp_path, steps=(1, 2, 3))
    _write_meta(_step(run, 2), HOSTILE_META[case])
    steps = torchkeep.CheckpointManager(run).steps()
    assert [s.step for s in steps] == [1, 2, 3]
    assert steps[1].problems and not steps[0].problems
    result = CliRunner().invoke(cli, ["ls", run])
    assert result.exit_code == 0 and "step 2" in result.output, result.output
    result = CliRunner().invoke(cli, ["ls", run, "--json"])
    assert result.exit_code == 0 and json.loads(result.output)["steps"][1]["problems"]
    result = CliRunner().invoke(cli, ["prune", run, "--keep-best", "1", "--monitor", "loss",
                                      "--dry-run"])  # fmt: skip
    assert result.exit_code == 0, result.output
    live = {"model": _model(42)}
    with torchkeep.CheckpointManager(run, keep_last=2, keep_best=1, monitor="loss") as mgr:
        assert mgr.restore(live) == 3
        mgr.save(4, live, metrics={"loss": 0.1})
    assert torch.equal(live["model"].weight, _model(3).weight)


def test_unparseable_meta_number_is_survivable(tmp_path) -> None:
    run = _run(tmp_path, steps=(1, 2))
    path = os.path.join(_step(run, 2), "meta.json")
    with open(path, "w") as handle:
        handle.write('{"time": ' + "9" * 5000 + "}")  # beyond Python's int-from-text limit
    assert [s.step for s in torchkeep.CheckpointManager(run).steps()] == [1, 2]
    assert CliRunner().invoke(cli, ["ls", run]).exit_code == 0
