"""Lightning resumes from a ``.ckpt`` that ``torchkeep convert`` wrote (issue 21 item 5)."""

from __future__ import annotations

import os

import pytest
import torch
from click.testing import CliRunner

import torchkeep
from torchkeep.cli.main import cli

pl = pytest.importorskip("lightning.pytorch")


class _Net(pl.LightningModule):
    def __init__(self, width: int = 4) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = torch.nn.Sequential(torch.nn.Linear(width, 3), torch.nn.BatchNorm1d(3))

    def training_step(self, batch, _idx):
        (x,) = batch
        return self.net(x).pow(2).mean()

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=0.01)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, 1)}


def _loader() -> torch.utils.data.DataLoader:
    data = torch.utils.data.TensorDataset(
        torch.randn(16, 4, generator=torch.Generator().manual_seed(1))
    )
    return torch.utils.data.DataLoader(data, batch_size=4)


def _trainer(tmp_path, epochs: int, checkpointing: bool) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=checkpointing,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
        deterministic=True,
    )


def _convert(src: str, dst: str) -> None:
    result = CliRunner().invoke(cli, ["convert", src, dst])
    assert result.exit_code == 0, result.output


def _resume(tmp_path, ckpt: str) -> tuple[pl.Trainer, _Net]:
    pl.seed_everything(2, verbose=False)
    model = _Net()
    trainer = _trainer(tmp_path / os.path.basename(ckpt), 2, False)
    trainer.fit(model, _loader(), ckpt_path=ckpt)
    return trainer, model


@pytest.mark.parametrize("via", ["tk", "direct"])
def test_lightning_resumes_from_converted_ckpt(tmp_path, via: str) -> None:
    pl.seed_everything(0, verbose=False)
    trainer = _trainer(tmp_path, 1, True)
    trainer.fit(_Net(), _loader())
    original = str(tmp_path / "orig.ckpt")
    trainer.save_checkpoint(original)
    converted = str(tmp_path / "back.ckpt")
    if via == "tk":  # .ckpt -> torchkeep -> .ckpt
        _convert(original, str(tmp_path / "mid.tk"))
        _convert(str(tmp_path / "mid.tk"), converted)
    else:  # .ckpt -> .ckpt directly
        _convert(original, converted)
    base_trainer, base = _resume(tmp_path, original)
    conv_trainer, conv = _resume(tmp_path, converted)
    assert conv_trainer.current_epoch == base_trainer.current_epoch == 2
    assert conv_trainer.global_step == base_trainer.global_step == 8
    assert conv.hparams["width"] == 4
    for (name, a), (_, b) in zip(base.state_dict().items(), conv.state_dict().items()):
        assert torch.equal(a, b), name
    assert conv_trainer.lr_scheduler_configs[0].scheduler.last_epoch == 2


def test_lightning_ckpt_to_flat_safetensors_loads_submodule(tmp_path) -> None:
    """A real Lightning checkpoint converted to flat safetensors keeps ``key=``/auto-unwrap."""
    pl.seed_everything(0, verbose=False)
    module = _Net()
    trainer = _trainer(tmp_path, 1, False)
    trainer.fit(module, _loader())
    ckpt = str(tmp_path / "run.ckpt")
    trainer.save_checkpoint(ckpt)
    flat = str(tmp_path / "run.safetensors")
    _convert(ckpt, flat)
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    report = torchkeep.load_state_dict(net, flat, key="state_dict.net")
    assert report.ok
    for name, value in net.state_dict().items():
        assert torch.equal(value, module.net.state_dict()[name]), name
    whole = _Net()  # 'state_dict.' unwraps by itself; optimizer tensors are ignored, not loaded
    report = torchkeep.load_state_dict(whole, flat, strict=False)
    assert not report.missing and any("state_dict." in note for note in report.notes)
    assert torchkeep.load_state_dict(_Net(), ckpt, key="state_dict").ok  # the .ckpt itself
