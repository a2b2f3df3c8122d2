"""CheckpointManager: layout, listing, sweeping, restore, mismatches, corruption, locking."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import torchkeep
from torchkeep.errors import (
    CheckpointNotFoundError,
    CorruptionError,
    LockError,
    StateDictMismatchError,
    StorageError,
    TorchkeepError,
)
from torchkeep.storage.io import FileOps, use_ops
from torchkeep.storage.local import temp_name
from torchkeep.storage.run_dir import list_leftovers, list_steps, step_dirname


def _state(seed: int = 0, width: int = 4) -> dict:
    torch.manual_seed(seed)
    model = nn.Linear(width, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(3, width)).sum().backward()
    opt.step()
    return {"model": model, "optimizer": opt, "epoch": seed, "history": [seed, "x"]}


def test_layout_meta_and_listing(tmp_path) -> None:
    with torchkeep.CheckpointManager(tmp_path, keep_best=1, monitor="loss") as mgr:
        assert mgr.restore(_state()) is None and mgr.latest_step() is None
        mgr.save(5, _state(1), metrics={"loss": torch.tensor(0.5)})
        mgr.save(12, _state(2), metrics={"loss": 0.25, "note": "ok"})
        step_dir = tmp_path / step_dirname(12)
        assert step_dir.name == "step-0000000012"
        assert sorted(os.listdir(step_dir)) == ["meta.json", "state.tk"]
        meta = json.loads((step_dir / "meta.json").read_text())
        assert meta["step"] == 12 and meta["metrics"] == {"loss": 0.25, "note": "ok"}
        assert meta["files"] == [
            {"name": "state.tk", "size": (step_dir / "state.tk").stat().st_size}
        ]
        assert meta["torchkeep_version"] == torchkeep.__version__
        assert mgr.latest_step() == 12 and mgr.best_step() == 12
        info = mgr.steps()[-1]
        assert info.size > meta["files"][0]["size"] and info.time == meta["time"]
        assert mgr.kept_reasons() == {12: ["last", "best"]}
    # the state file opens with stock safetensors
    from safetensors import safe_open

    with safe_open(str(step_dir / "state.tk"), "pt") as f:
        assert "objects.model.weight" in list(f.keys())


def test_restore_latest_and_given_step(tmp_path) -> None:
    with torchkeep.CheckpointManager(tmp_path) as mgr:
        saved = {}
        for step in (1, 2):
            state = _state(step)
            saved[step] = state["model"].weight.detach().clone()
            mgr.save(step, state)
        target = _state(9)
        assert mgr.restore(target) == 2
        assert torch.equal(target["model"].weight, saved[2])
        assert target["epoch"] == 2 and target["history"] == [2, "x"]
        assert mgr.restore(target, step=1) == 1
        assert torch.equal(target["model"].weight, saved[1])
        assert target["optimizer"].state_dict()["state"][0]["exp_avg"].device.type == "cpu"
        with pytest.raises(CheckpointNotFoundError, match="no committed step 7"):
            mgr.restore(target, step=7)


def test_steps_are_immutable_and_keys_validated(tmp_path) -> None:
    with torchkeep.CheckpointManager(tmp_path) as mgr:
        mgr.save(1, _state())
        with pytest.raises(TorchkeepError, match="already exists"):
            mgr.save(1, _state())
        with pytest.raises(TorchkeepError, match="non-negative"):
            mgr.save(-1, _state())
        with pytest.raises(TorchkeepError, match="not a number"):
            mgr.save(2, _state(), metrics={"loss": [1]})


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda s: s.update(model=nn.Linear(5, 2)), r"(?s)model.*weight"),
        (lambda s: s.update(extra=3), r"state\['extra'\] is not in the checkpoint"),
        (lambda s: s.pop("optimizer"), r"object 'optimizer' that the state lacks"),
        (lambda s: s.update(epoch=nn.Linear(1, 1)), r"state\['epoch'\].*plain value"),
        (lambda s: s.update(model=5), r"stateful object for state\['model'\]"),
    ],
)
def test_restore_into_mismatched_state_names_the_entry(tmp_path, change, match: str) -> None:
    with torchkeep.CheckpointManager(tmp_path) as mgr:
        mgr.save(1, _state())
        target = _state(3)
        change(target)
        with pytest.raises(StateDictMismatchError, match=match):
            mgr.restore(target)


def test_optimizer_shape_mismatch_names_the_state(tmp_path) -> None:
    path = tmp_path / "c.tk"
    torchkeep.save_checkpoint(path, _state())
    other = _state(width=4)
    model = nn.Linear(4, 3)  # same parameter count, different shapes
    other["model"], other["optimizer"] = model, torch.optim.AdamW(model.parameters())
    with pytest.raises(StateDictMismatchError, match="model"):
        torchkeep.load_checkpoint(path, other)
    only_opt = {"optimizer": other["optimizer"]}
    torchkeep.save_checkpoint(tmp_path / "o.tk", {"optimizer": _state()["optimizer"]})
    with pytest.raises(StateDictMismatchError, match=r"state\[0\]\.exp_avg has shape"):
        torchkeep.load_checkpoint(tmp_path / "o.tk", only_opt)


def _corrupt(step_dir) -> None:
    path = step_dir / "state.tk"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def test_corrupt_step_raises_or_falls_back(tmp_path) -> None:
    with torchkeep.CheckpointManager(tmp_path) as mgr:
        mgr.save(1, _state(1))
        mgr.save(2, _state(2))
        _corrupt(tmp_path / step_dirname(2))
        target = _state(5)
        before = target["model"].weight.detach().clone()
        with pytest.raises(CorruptionError, match="corrupt"):
            mgr.restore(target)
        assert torch.equal(target["model"].weight, before)  # nothing was modified
        with pytest.warns(UserWarning, match="restored step 1"):
            assert mgr.restore(target, fallback=True) == 1
        assert "step 2" in mgr.last_restore_note and target["epoch"] == 1


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_leftovers_listed_never_restored_and_swept(tmp_path) -> None:
    with torchkeep.CheckpointManager(tmp_path) as mgr:
        mgr.save(1, _state(1))
    alive = temp_name(str(tmp_path / step_dirname(9)))
    os.makedirs(alive)
    dead = alive.replace(f".{os.getpid()}.", f".{_dead_pid()}.")
    os.makedirs(dead)
    (tmp_path / "notes.txt").write_text("not a step")
    os.makedirs(tmp_path / "step-12")  # wrong width: not a step
    assert [s.step for s in list_steps(tmp_path)] == [1]
    assert sorted(list_leftovers(tmp_path)) == sorted([alive, dead])
    with torchkeep.CheckpointManager(tmp_path) as mgr:  # sweeps dead writers' temporaries
        assert list_leftovers(tmp_path) == [alive]
        assert mgr.restore(_state()) == 1


class FailAt(FileOps):
    def __init__(self, name: str) -> None:
        self.name = name

    def replace(self, src: str, dst: str) -> None:
        if self.name == "replace" and os.path.basename(dst).startswith("step-"):
            raise OSError(28, "No space left on device")
        super().replace(src, dst)

    def rmtree(self, path: str) -> None:
        if self.name == "rmtree":
            raise OSError(5, "I/O error")
        super().rmtree(path)


def test_failed_commit_leaves_nothing_visible(tmp_path) -> None:
    with torchkeep.CheckpointManager(tmp_path) as mgr:
        mgr.save(1, _state())
        with use_ops(FailAt("replace")), pytest.raises(StorageError, match="disk is full"):
            mgr.save(2, _state())
        assert [s.step for s in mgr.steps()] == [1]
        assert list_leftovers(tmp_path) == []


def test_crash_mid_deletion_leaves_only_complete_steps(tmp_path) -> None:
    with torchkeep.CheckpointManager(tmp_path, keep_last=1) as mgr:
        mgr.save(1, _state())
        with use_ops(FailAt("rmtree")), pytest.raises(OSError):
            mgr.save(2, _state())
        assert [s.step for s in mgr.steps()] == [2]
        assert len(list_leftovers(tmp_path)) == 1  # the renamed step 1, swept later
        assert mgr.restore(_state()) == 2


def test_retention_through_manager(tmp_path) -> None:
    losses = {1: 0.5, 2: 0.1, 3: 0.4, 4: 0.3, 5: 0.6, 6: 0.7}
    with torchkeep.CheckpointManager(tmp_path, keep_last=2, keep_best=1, monitor="loss") as mgr:
        for step, loss in losses.items():
            mgr.save(step, _state(), metrics={"loss": loss})
        assert [s.step for s in mgr.steps()] == [2, 5, 6]
        assert mgr.best_step() == 2
        assert {s.step: s.metrics["loss"] for s in mgr.steps()} == {2: 0.1, 5: 0.6, 6: 0.7}


HOLDER = textwrap.dedent(
    """
    import sys, time, torch, torchkeep
    mgr = torchkeep.CheckpointManager(sys.argv[1])
    mgr.save(1, {"w": torch.ones(2)})
    print("ready", flush=True)
    time.sleep(120)
    """
)


def test_second_writer_gets_lock_error_until_first_dies(tmp_path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline().strip() == "ready"
        mgr = torchkeep.CheckpointManager(tmp_path)
        assert mgr.restore({"w": torch.zeros(2)}) == 1  # reading needs no lock
        with pytest.raises(LockError, match=rf"pid {proc.pid}.*is writing"):
            mgr.save(2, {"w": torch.zeros(2)})
        with pytest.raises(LockError):
            torchkeep.retention.prune(tmp_path, keep_last=1)
    finally:
        proc.kill()
        proc.wait()
    mgr.save(2, {"w": torch.zeros(2)})  # SIGKILL released the lock
    mgr.close()
    assert [s.step for s in list_steps(tmp_path)] == [1, 2]


def test_mismatch_in_a_later_object_modifies_nothing(tmp_path) -> None:
    path = tmp_path / "two.tk"
    first, second = nn.Linear(2, 2), nn.Linear(3, 1)
    torchkeep.save_checkpoint(path, {"a": first, "b": second})
    target_a = nn.Linear(2, 2)
    before = target_a.weight.detach().clone()
    with pytest.raises(StateDictMismatchError, match=r"(?s)state\['b'\].*weight"):
        torchkeep.load_checkpoint(path, {"a": target_a, "b": nn.Linear(4, 1)})
    assert torch.equal(target_a.weight, before)
