"""The classic story with torchkeep: train logistic regression, save, load, check it all matches.

    python examples/basics.py

Trains ``nn.Linear(6, 1)`` + sigmoid on synthetic data with SGD, saves the model's
``state_dict`` and a checkpoint dict ``{"epoch", "model_state", "optim_state"}`` with
``torchkeep.save``, loads both into a fresh model and optimizer, and exits non-zero if the
predictions or the optimizer state differ in any bit.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

import torchkeep

N_INPUT_FEATURES = 6


class Model(nn.Module):
    """Logistic regression: one linear layer and a sigmoid."""

    def __init__(self, n_input_features: int) -> None:
        super().__init__()
        self.linear = nn.Linear(n_input_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.linear(x))


def synthetic_data(n: int = 256, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Points labelled by a fixed hidden hyperplane."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, N_INPUT_FEATURES, generator=gen)
    true_w = torch.linspace(-1.0, 1.5, N_INPUT_FEATURES)
    y = ((x @ true_w) > 0).float().unsqueeze(1)
    return x, y


def train(model: nn.Module, opt: torch.optim.Optimizer, x, y, epochs: int) -> float:
    loss_fn = nn.BCELoss()
    for _ in range(epochs):
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
    return loss.item()


def same_optimizer_state(a: dict, b: dict) -> bool:
    if a["param_groups"] != b["param_groups"] or a["state"].keys() != b["state"].keys():
        return False
    for idx, state in a["state"].items():
        other = b["state"][idx]
        if state.keys() != other.keys():
            return False
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                if not torch.equal(value, other[key]):
                    return False
            elif value != other[key]:
                return False
    return True


def main() -> int:
    torch.manual_seed(0)
    x, y = synthetic_data()
    model = Model(N_INPUT_FEATURES)
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    loss = train(model, opt, x, y, epochs=100)
    print(f"trained: loss {loss:.4f}")

    checks: dict[str, bool] = {}
    with tempfile.TemporaryDirectory() as tmp:
        # Way 1: the state_dict alone.
        weights = Path(tmp) / "model.tk"
        torchkeep.save(model.state_dict(), weights)
        fresh = Model(N_INPUT_FEATURES)
        report = torchkeep.load_state_dict(fresh, weights)
        print(f"state_dict:      {report}")
        checks["predictions (state_dict)"] = torch.equal(fresh(x), model(x))

        # Way 2: a checkpoint dict to resume training.
        ckpt_path = Path(tmp) / "checkpoint.tk"
        ckpt = {"epoch": 100, "model_state": model.state_dict(), "optim_state": opt.state_dict()}
        torchkeep.save(ckpt, ckpt_path)
        loaded = torchkeep.load(ckpt_path)
        resumed = Model(N_INPUT_FEATURES)
        resumed_opt = torch.optim.SGD(resumed.parameters(), lr=0.0)
        resumed.load_state_dict(loaded["model_state"])
        resumed_opt.load_state_dict(loaded["optim_state"])
        print(f"checkpoint dict: epoch {loaded['epoch']}, keys {sorted(loaded)}")
        checks["epoch is an int"] = type(loaded["epoch"]) is int and loaded["epoch"] == 100
        checks["predictions (checkpoint)"] = torch.equal(resumed(x), model(x))
        checks["optimizer state"] = same_optimizer_state(opt.state_dict(), resumed_opt.state_dict())

        # Both continue training identically, bit for bit.
        train(model, opt, x, y, epochs=5)
        train(resumed, resumed_opt, x, y, epochs=5)
        checks["5 more steps"] = all(
            torch.equal(a, b) for a, b in zip(model.parameters(), resumed.parameters())
        )

    for name, ok in checks.items():
        print(f"  {'ok  ' if ok else 'FAIL'} {name}")
    if not all(checks.values()):
        print("mismatch: torchkeep did not restore the training state exactly", file=sys.stderr)
        return 1
    print("everything matches")
    return 0


if __name__ == "__main__":
    sys.exit(main())
