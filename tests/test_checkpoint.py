"""save_checkpoint / load_checkpoint: full training state, RNG, plain values, errors."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch import nn

import torchkeep
from torchkeep.errors import StateDictMismatchError, TorchkeepError, UnsupportedValueError


def _training_state(seed: int) -> dict:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    for _ in range(seed + 1):
        opt.zero_grad()
        scaler.scale(model(torch.randn(5, 3)).pow(2).mean()).backward()
        scaler.step(opt)
        scaler.update()
        sched.step()
    return {
        "model": model,
        "optimizer": opt,
        "scheduler": sched,
        "scaler": scaler,
        "epoch": seed,
        "best": {"loss": 0.5, "tags": ("a", 1)},
    }


def test_round_trip_restores_every_object_and_value(tmp_path) -> None:
    path = tmp_path / "ckpt.tk"
    saved = _training_state(3)
    torchkeep.save_checkpoint(path, saved)
    fresh = _training_state(0)
    assert torchkeep.load_checkpoint(path, fresh) is fresh
    for key, value in saved["model"].state_dict().items():
        assert torch.equal(fresh["model"].state_dict()[key], value), key
    opt_a, opt_b = saved["optimizer"].state_dict(), fresh["optimizer"].state_dict()
    assert opt_a["param_groups"] == opt_b["param_groups"]
    for pid, slot in opt_a["state"].items():
        assert torch.equal(slot["momentum_buffer"], opt_b["state"][pid]["momentum_buffer"])
    assert fresh["scheduler"].state_dict() == saved["scheduler"].state_dict()
    assert fresh["scaler"].state_dict() == saved["scaler"].state_dict()
    assert fresh["epoch"] == 3 and fresh["best"] == {"loss": 0.5, "tags": ("a", 1)}


def test_rng_state_is_captured_and_restored(tmp_path) -> None:
    path = tmp_path / "rng.tk"
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.normal()  # leaves a cached gaussian in NumPy's state
    torchkeep.save_checkpoint(path, {"n": 1})
    expected = (random.random(), np.random.normal(), np.random.rand(), torch.rand(3))
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    torchkeep.load_checkpoint(path, {"n": 0})
    got = (random.random(), np.random.normal(), np.random.rand(), torch.rand(3))
    assert got[:3] == expected[:3] and torch.equal(got[3], expected[3])


def test_rng_opt_out(tmp_path) -> None:
    path = tmp_path / "norng.tk"
    torchkeep.save_checkpoint(path, {"n": 1}, rng=False)
    torch.manual_seed(5)
    before = torch.get_rng_state()
    with pytest.warns(UserWarning, match="no RNG state"):
        state = torchkeep.load_checkpoint(path, {"n": 0})
    assert state["n"] == 1 and torch.equal(torch.get_rng_state(), before)
    torch.manual_seed(5)
    state = torchkeep.load_checkpoint(path, {"n": 0}, rng=False)
    assert state["n"] == 1 and torch.initial_seed() == 5


def test_user_stateful_object(tmp_path) -> None:
    class Counter:
        def __init__(self) -> None:
            self.count = 0

        def state_dict(self) -> dict:
            return {"count": self.count}

        def load_state_dict(self, sd: dict) -> None:
            if set(sd) != {"count"}:
                raise KeyError("count")
            self.count = sd["count"]

    counter = Counter()
    counter.count = 41
    torchkeep.save_checkpoint(tmp_path / "c.tk", {"counter": counter})
    other = Counter()
    torchkeep.load_checkpoint(tmp_path / "c.tk", {"counter": other})
    assert other.count == 41


def test_errors_before_writing_and_on_foreign_files(tmp_path) -> None:
    with pytest.raises(UnsupportedValueError, match="values.fn"):
        torchkeep.save_checkpoint(tmp_path / "bad.tk", {"fn": object()})
    assert not (tmp_path / "bad.tk").exists()
    torchkeep.save({"w": torch.ones(1)}, tmp_path / "plain.tk")
    with pytest.raises(TorchkeepError, match="not a torchkeep training checkpoint"):
        torchkeep.load_checkpoint(tmp_path / "plain.tk", {"w": 0})
    with pytest.raises(TorchkeepError, match="dict of name"):
        torchkeep.save_checkpoint(tmp_path / "x.tk", [1, 2])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_rng_and_optimizer_state_device(tmp_path) -> None:
    model = nn.Linear(4, 2).cuda()
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(3, 4, device="cuda")).sum().backward()
    opt.step()
    torchkeep.save_checkpoint(tmp_path / "g.tk", {"model": model, "optimizer": opt})
    expected = torch.rand(3, device="cuda")
    fresh_model = nn.Linear(4, 2).cuda()
    fresh = {"model": fresh_model, "optimizer": torch.optim.AdamW(fresh_model.parameters())}
    torchkeep.load_checkpoint(tmp_path / "g.tk", fresh)
    assert torch.equal(torch.rand(3, device="cuda"), expected)
    for slot in fresh["optimizer"].state.values():
        assert slot["exp_avg"].device.type == "cuda"


@pytest.mark.parametrize(
    "make",
    [
        lambda opt: torch.optim.lr_scheduler.ReduceLROnPlateau(opt),  # holds inf
        lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=10),
        lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 0.9**e),
        lambda opt: torch.optim.lr_scheduler.SequentialLR(
            opt,
            [
                torch.optim.lr_scheduler.ConstantLR(opt),
                torch.optim.lr_scheduler.ExponentialLR(opt, 0.9),
            ],
            milestones=[2],
        ),
    ],
)
def test_scheduler_zoo_round_trips(tmp_path, make) -> None:
    opt = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)
    sched = make(opt)
    for _ in range(3):
        opt.step()
        sched.step(1.0) if isinstance(
            sched, torch.optim.lr_scheduler.ReduceLROnPlateau
        ) else sched.step()
    torchkeep.save_checkpoint(tmp_path / "s.tk", {"s": sched}, rng=False)
    fresh = make(torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1))
    torchkeep.load_checkpoint(tmp_path / "s.tk", {"s": fresh}, rng=False)
    assert repr(fresh.state_dict()) == repr(sched.state_dict())


def test_modules_are_read_straight_into_parameters(tmp_path, monkeypatch) -> None:
    """Module weights skip the materialized tree: no read_entry for them, same data_ptr after;
    every other object is read (and verified) as before."""
    from torchkeep.transfer.reader import FileReader

    path = tmp_path / "ckpt.tk"
    saved = _training_state(2)
    torchkeep.save_checkpoint(path, saved)
    fresh = _training_state(0)
    before = {k: p.data_ptr() for k, p in fresh["model"].state_dict().items()}
    read: list[str] = []
    original = FileReader.read_entry

    def spy(self, key, verify=True):
        read.append(key)
        return original(self, key, verify)

    monkeypatch.setattr(FileReader, "read_entry", spy)
    torchkeep.load_checkpoint(path, fresh)
    assert read and not [k for k in read if k.startswith("objects.model.")], read
    assert any(k.startswith("objects.optimizer.") for k in read)
    for key, value in saved["model"].state_dict().items():
        assert torch.equal(fresh["model"].state_dict()[key], value), key
        assert fresh["model"].state_dict()[key].data_ptr() == before[key], key


def test_corrupt_module_weight_is_caught_before_anything_changes(tmp_path) -> None:
    from torchkeep.transfer.reader import FileReader

    path = tmp_path / "ckpt.tk"
    torchkeep.save_checkpoint(path, _training_state(1))
    with FileReader(path) as reader:
        at = reader.header.data_start + reader.entry("objects.model.0.weight").begin + 2
    blob = bytearray(path.read_bytes())
    blob[at] ^= 0x10
    path.write_bytes(bytes(blob))
    fresh = _training_state(0)
    weights = {k: v.clone() for k, v in fresh["model"].state_dict().items()}
    with pytest.raises(torchkeep.CorruptionError, match="objects.model.0.weight"):
        torchkeep.load_checkpoint(path, fresh)
    for key, value in fresh["model"].state_dict().items():
        assert torch.equal(value, weights[key]), key  # the model was not touched
    assert fresh["epoch"] == 0
    state = _training_state(0)
    torchkeep.load_checkpoint(path, state, verify=False)  # unverified: loads the damaged bytes


def test_object_named_like_a_module_prefix_is_not_mistaken_for_it(tmp_path) -> None:
    """``model.ema`` (a plain stateful object) next to module ``model``: each restores its own."""

    class Counter:
        def __init__(self, n: int) -> None:
            self.n = torch.tensor([float(n)])

        def state_dict(self) -> dict:
            return {"n": self.n}

        def load_state_dict(self, sd: dict) -> None:
            self.n = sd["n"].clone()

    path = tmp_path / "ckpt.tk"
    saved = _training_state(1)
    torchkeep.save_checkpoint(path, {"model": saved["model"], "model.ema": Counter(7)})
    fresh = {"model": _training_state(0)["model"], "model.ema": Counter(0)}
    torchkeep.load_checkpoint(path, fresh)
    assert torch.equal(fresh["model.ema"].n, torch.tensor([7.0]))
    for key, value in saved["model"].state_dict().items():
        assert torch.equal(fresh["model"].state_dict()[key], value), key


def test_module_shape_mismatch_leaves_every_object_untouched(tmp_path) -> None:
    path = tmp_path / "ckpt.tk"
    torchkeep.save_checkpoint(path, _training_state(1))
    fresh = _training_state(0)
    fresh["model"][0] = nn.Linear(3, 5)  # a different architecture
    weights = {k: v.clone() for k, v in fresh["model"].state_dict().items()}
    with pytest.raises(StateDictMismatchError, match="model"):
        torchkeep.load_checkpoint(path, fresh)
    for key, value in fresh["model"].state_dict().items():
        assert torch.equal(value, weights[key]), key
    assert fresh["epoch"] == 0
