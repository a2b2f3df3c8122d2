"""A training-state restore is all or nothing (issue 18, finding 5).

A checkpoint whose RNG state, loader state or one object's state is bad must raise before the
model, the optimizer or any plain value changes; a checkpoint without RNG state restores the
rest with a warning. Each case goes through ``load_checkpoint`` and ``CheckpointManager.restore``.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import torchkeep
from torchkeep.errors import StateDictMismatchError
from torchkeep.state.capture import capture


class Recorder:
    """A user stateful object: ``load_state_dict`` replaces its value; with ``fail`` it half
    applies the checkpoint's value (1) and then refuses it."""

    def __init__(self, value: int, fail: bool = False) -> None:
        self.value, self.fail = value, fail

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        if self.fail and state["value"] == 1:
            self.value = -1  # half-applied, then refuses: the rollback must undo this too
            raise ValueError("refusing this state")
        self.value = state["value"]


def _state(seed: int) -> dict:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    sched.step()
    return {"model": model, "optimizer": opt, "scheduler": sched, "epoch": seed}


def _fingerprint(state: dict) -> tuple:
    weights = [t.clone() for t in state["model"].state_dict().values()]
    opt = state["optimizer"].state_dict()
    moments = [v["exp_avg"].clone() for v in opt["state"].values()]
    return weights, moments, state["scheduler"].state_dict()["last_epoch"], state["epoch"]


def _same(a: tuple, b: tuple) -> bool:
    return (
        all(torch.equal(x, y) for x, y in zip(a[0], b[0]))
        and all(torch.equal(x, y) for x, y in zip(a[1], b[1]))
        and a[2:] == b[2:]
    )


def _break_python_len(tree):
    tree["rng"]["python"]["state"] = tree["rng"]["python"]["state"][:100]


def _break_python_view(tree):
    tree["rng"]["python"]["state"] = torch.zeros(1, dtype=torch.int64).expand(2**20)


def _break_numpy_range(tree):
    tree["rng"]["numpy"]["keys"] = torch.full((624,), 2**40, dtype=torch.int64)


def _break_numpy_name(tree):
    tree["rng"]["numpy"]["name"] = "NOT-A-GENERATOR"


def _break_torch_size(tree):
    tree["rng"]["torch"] = torch.zeros(7, dtype=torch.uint8)


def _break_torch_type(tree):
    tree["rng"]["torch"] = "not a tensor"


def _break_gauss(tree):
    tree["rng"]["python"]["gauss"] = "x"


def _break_rng_type(tree):
    tree["rng"] = [1, 2, 3]


def _break_python_version(tree):
    tree["rng"]["python"]["version"] = 99


BREAKS = [
    _break_python_len,
    _break_python_view,
    _break_numpy_range,
    _break_numpy_name,
    _break_torch_size,
    _break_torch_type,
    _break_gauss,
    _break_rng_type,
    _break_python_version,
]


@pytest.mark.parametrize("breaker", BREAKS, ids=lambda f: f.__name__[7:])
def test_bad_rng_changes_nothing(tmp_path, breaker) -> None:
    tree = capture(_state(1))
    breaker(tree)
    path = tmp_path / "forged.tk"
    torchkeep.save(tree, path)
    live = _state(2)
    before = _fingerprint(live)
    rng_before = torch.get_rng_state()
    with pytest.raises(StateDictMismatchError, match="rng"):
        torchkeep.load_checkpoint(path, live)
    assert _same(_fingerprint(live), before)
    assert torch.equal(torch.get_rng_state(), rng_before)


def test_bad_rng_through_manager_changes_nothing(tmp_path) -> None:
    with torchkeep.CheckpointManager(tmp_path / "run") as mgr:
        mgr.save(1, _state(1))
    state_file = next((tmp_path / "run").glob("step-*/state.tk"))
    tree = torchkeep.load(state_file)
    _break_python_view(tree)
    torchkeep.save(tree, state_file)  # the manager trusts the step's own checksums
    live = _state(2)
    before = _fingerprint(live)
    with (
        torchkeep.CheckpointManager(tmp_path / "run") as mgr,
        pytest.raises(StateDictMismatchError, match="rng"),
    ):
        mgr.restore(live)
    assert _same(_fingerprint(live), before)


def test_bad_loader_state_changes_nothing(tmp_path) -> None:
    tree = capture(_state(1))
    tree["loaders"] = {"epoch": {"loader": torch.zeros(3, dtype=torch.uint8)}}
    path = tmp_path / "forged.tk"
    torchkeep.save(tree, path)
    live = _state(2)
    before = _fingerprint(live)
    with pytest.raises(StateDictMismatchError, match="loaders"):
        torchkeep.load_checkpoint(path, live)
    assert _same(_fingerprint(live), before)


def test_object_that_refuses_rolls_back_the_others(tmp_path) -> None:
    saved = {"first": Recorder(1), "second": Recorder(1), "epoch": 7, **_state(1)}
    path = tmp_path / "ok.tk"
    torchkeep.save_checkpoint(path, saved)
    live = {"first": Recorder(5), "second": Recorder(5, fail=True), "epoch": 0, **_state(2)}
    before = _fingerprint(live)
    with pytest.raises(StateDictMismatchError, match="second"):
        torchkeep.load_checkpoint(path, live)
    assert live["first"].value == 5 and live["second"].value == 5
    assert _same(_fingerprint(live), before)


def test_missing_rng_restores_the_rest_with_a_warning(tmp_path) -> None:
    saved = _state(1)
    path = tmp_path / "norng.tk"
    torchkeep.save_checkpoint(path, saved, rng=False)
    live = _state(2)
    torch.manual_seed(123)
    rng_before = torch.get_rng_state()
    with pytest.warns(UserWarning, match="no RNG state"):
        torchkeep.load_checkpoint(path, live)
    assert _same(_fingerprint(live), _fingerprint(saved))
    assert torch.equal(torch.get_rng_state(), rng_before)


def test_missing_rng_through_manager(tmp_path) -> None:
    saved = _state(1)
    with torchkeep.CheckpointManager(tmp_path / "run", rng=False) as mgr:
        mgr.save(3, saved)
    live = _state(2)
    with (
        warnings.catch_warnings(record=True) as caught,
        torchkeep.CheckpointManager(tmp_path / "run") as mgr,
    ):
        warnings.simplefilter("always")
        assert mgr.restore(live) == 3
    assert any("no RNG state" in str(w.message) for w in caught)
    assert _same(_fingerprint(live), _fingerprint(saved))
