"""Accelerate: a real Accelerator (CPU) saving and resuming through torchkeep, and its own
save_state folders read without trusted=True (RNG pickles through the NumPy allow-list)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch import nn

import torchkeep
from torchkeep.readers.open import open_view

accelerate = pytest.importorskip("accelerate")
from torchkeep.integrations.accelerate import load_state, save_state  # noqa: E402


class Counter:
    """A custom object registered for checkpointing (state_dict of plain values)."""

    def __init__(self) -> None:
        self.seen = 0

    def state_dict(self) -> dict:
        return {"seen": self.seen}

    def load_state_dict(self, state: dict) -> None:
        self.seen = state["seen"]


def setup(seed: int, width: int):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(width, 32), nn.Dropout(0.3), nn.Linear(32, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, 2, 0.5)
    accelerator = accelerate.Accelerator(cpu=True)
    counter = Counter()
    accelerator.register_for_checkpointing(counter)
    model, opt, sched = accelerator.prepare(model, opt, sched)
    return accelerator, model, opt, sched, counter


def batch(step: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(step)
    return torch.randn(8, width, generator=gen), torch.randn(8, 1, generator=gen)


def train(accelerator, model, opt, sched, counter, steps: int, width: int) -> None:
    for _ in range(steps):
        x, y = batch(accelerator.step, width)
        noise = float(np.random.rand()) * 1e-3 + random.random() * 1e-3  # all RNGs matter
        loss = nn.functional.mse_loss(model(x), y) + noise
        accelerator.backward(loss)
        opt.step()
        sched.step()
        opt.zero_grad()
        accelerator.step += 1
        counter.seen += 1


@pytest.mark.slow
def test_save_state_resume_is_bit_exact(tmp_path, long_run: bool) -> None:
    steps, width = (20, 256) if long_run else (3, 4)  # full form under make test-long
    path = tmp_path / "ckpt" / "state.tk"
    acc, model, opt, sched, counter = setup(0, width)
    train(acc, model, opt, sched, counter, steps, width)
    written = save_state(acc, path)
    assert written == str(path) and torchkeep.verify(path) == []
    train(acc, model, opt, sched, counter, steps, width)
    straight = {k: v.clone() for k, v in model.state_dict().items()}

    acc2, model2, opt2, sched2, counter2 = setup(1, width)  # different initial weights
    load_state(acc2, path)
    assert acc2.step == steps and counter2.seen == steps
    assert sched2.scheduler.last_epoch == steps
    train(acc2, model2, opt2, sched2, counter2, steps, width)
    for key, value in model2.state_dict().items():
        assert torch.equal(value, straight[key]), key

    saved = torchkeep.load(path)
    assert set(saved["objects"]) >= {"model", "optimizer", "scheduler", "custom_checkpoint_0"}
    assert saved["values"]["step"] == steps and "rng" in saved


def test_load_state_refuses_a_mismatched_model(tmp_path) -> None:
    acc, model, opt, sched, counter = setup(0, 4)
    save_state(acc, tmp_path / "s.tk")
    acc2, model2, opt2, sched2, counter2 = setup(0, 6)  # other input width
    before = {k: v.clone() for k, v in model2.state_dict().items()}
    with pytest.raises(torchkeep.StateDictMismatchError) as info:
        load_state(acc2, tmp_path / "s.tk")
    assert "model" in str(info.value)
    for key, value in model2.state_dict().items():
        assert torch.equal(value, before[key]), key  # nothing changed


def test_accelerate_save_state_folder_reads_rng_without_trusted(tmp_path) -> None:
    acc, model, opt, sched, counter = setup(0, 4)
    np.random.seed(7)
    expected = np.random.get_state()
    folder = tmp_path / "acc"
    acc.save_state(str(folder))
    with open_view(folder) as view:
        assert view.format == "accelerate" and not view.notes
        assert "optimizer.state.0.exp_avg" in view.refs or "optimizer" in view.skeleton
    state = torchkeep.load(folder)
    rng = state["random_states_0"]
    assert rng["step"] == 0 and isinstance(rng["torch_manual_seed"], torch.Tensor)
    name, keys, pos, *_ = rng["numpy_random_seed"]
    assert name == "MT19937" and keys.dtype == np.uint32 and pos == expected[2]
    assert np.array_equal(keys, expected[1])
    assert rng["random_state"][0] == 3 and len(rng["random_state"][1]) == 625
    assert set(state["model"]) == {"0.weight", "0.bias", "2.weight", "2.bias"}
