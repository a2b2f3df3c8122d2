"""A real Lightning module (hyperparameters in a dict subclass, AttributeDict) round-trips
through save_model/load_model without running its code."""

from __future__ import annotations

import warnings

import pytest
import torch

import torchkeep

L = pytest.importorskip("lightning")


class Classifier(L.LightningModule):
    def __init__(self, width: int = 4, lr: float = 0.1):
        super().__init__()
        self.save_hyperparameters()
        self.net = torch.nn.Sequential(torch.nn.Linear(3, width), torch.nn.ReLU())
        self.head = torch.nn.Linear(width, 2)

    def forward(self, x):
        return self.head(self.net(x))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


def test_lightning_module_round_trip(tmp_path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = Classifier(width=5).eval()
    torchkeep.save_model(model, tmp_path / "m.tk")
    loaded = torchkeep.load_model(tmp_path / "m.tk")
    x = torch.randn(2, 3)
    assert torch.equal(model(x), loaded(x))
    assert type(loaded.hparams) is type(model.hparams)  # AttributeDict, a dict subclass
    assert dict(loaded.hparams) == {"width": 5, "lr": 0.1} and loaded.hparams.lr == 0.1
    assert loaded.hparams_initial == model.hparams_initial
    assert isinstance(loaded.configure_optimizers(), torch.optim.SGD)
