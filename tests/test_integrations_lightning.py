"""Lightning CheckpointIO plugin, tested with real Trainer.fit runs on CPU (no mocks)."""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from torch import nn

import torchkeep

L = pytest.importorskip("lightning")
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from lightning.pytorch.plugins.io import AsyncCheckpointIO, TorchCheckpointIO  # noqa: E402

from torchkeep.integrations.lightning import TorchkeepCheckpointIO  # noqa: E402


class Tiny(L.LightningModule):
    def __init__(self, lr: float = 0.1, width: int = 4, note: object = "plain") -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(width, 8), nn.Tanh(), nn.Linear(8, 1))

    def training_step(self, batch, _index):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        opt = torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
        return [opt], [torch.optim.lr_scheduler.StepLR(opt, 1, 0.7)]


def loader(width: int = 4, n: int = 32) -> torch.utils.data.DataLoader:
    gen = torch.Generator().manual_seed(1)
    data = torch.utils.data.TensorDataset(torch.randn(n, width, generator=gen), torch.randn(n, 1))
    return torch.utils.data.DataLoader(data, batch_size=8)  # no shuffle: same batches on resume


def fit(root, epochs: int, plugin=None, ckpt_path=None, width: int = 4, **ckpt_kw) -> Tiny:
    torch.manual_seed(0)
    model = Tiny(width=width)
    trainer = L.Trainer(
        max_epochs=epochs,
        plugins=[plugin] if plugin is not None else None,
        default_root_dir=str(root),
        callbacks=[ModelCheckpoint(dirpath=str(root / "ckpt"), save_last=True, **ckpt_kw)],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, loader(width), ckpt_path=ckpt_path)
    return model


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_every_checkpoint_is_a_verified_torchkeep_file(tmp_path) -> None:
    fit(tmp_path, 2, TorchkeepCheckpointIO())
    names = sorted(os.listdir(tmp_path / "ckpt"))
    assert names == ["epoch=1-step=8.ckpt", "last.ckpt"]  # top-1 kept, epoch 0 removed
    path = str(tmp_path / "ckpt" / "last.ckpt")
    with torchkeep.open_file(path) as reader:
        assert reader.is_torchkeep
    assert torchkeep.verify(path) == []
    with open(path, "rb") as handle:
        assert b"\x80\x02" not in handle.read(16)  # a safetensors header, not a pickle
    ckpt = torchkeep.load(path)
    for key in ("state_dict", "optimizer_states", "lr_schedulers", "loops", "callbacks"):
        assert key in ckpt, key
    assert ckpt["epoch"] == 1 and ckpt["global_step"] == 8
    assert ckpt["hyper_parameters"] == {"lr": 0.1, "width": 4, "note": "plain"}
    assert ckpt["optimizer_states"][0]["param_groups"][0]["initial_lr"] == 0.1
    assert ckpt["lr_schedulers"][0]["last_epoch"] == 2
    assert not [n for n in os.listdir(tmp_path / "ckpt") if n.startswith(".")]


def test_checkpoint_dict_round_trips_exactly(tmp_path) -> None:
    fit(tmp_path / "native", 2)
    native = torch.load(tmp_path / "native" / "ckpt" / "last.ckpt", weights_only=True)
    torchkeep.save(native, tmp_path / "copy.ckpt")
    back = TorchkeepCheckpointIO().load_checkpoint(tmp_path / "copy.ckpt")
    assert_tree_equal(native, back)
    # Lightning's own pickled .ckpt loads through the plugin too (weights-only rules)
    legacy = TorchkeepCheckpointIO().load_checkpoint(tmp_path / "native" / "ckpt" / "last.ckpt")
    assert_tree_equal(native, legacy)


def assert_tree_equal(a, b, path: str = "") -> None:
    assert type(a) is type(b), (path, type(a), type(b))
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b) and a.dtype == b.dtype, path
    elif isinstance(a, dict):
        assert list(a) == list(b), path
        for key in a:
            assert_tree_equal(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_tree_equal(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


@pytest.mark.slow
def test_resume_from_last_matches_lightnings_own_ckpt(tmp_path, long_run: bool) -> None:
    """fit(ckpt_path="last") from a torchkeep file ends where a native resume ends."""
    epochs, width = (8, 256) if long_run else (3, 4)  # full form under make test-long
    half = epochs // 2
    fit(tmp_path / "tk", half, TorchkeepCheckpointIO(), width=width)
    resumed_tk = fit(tmp_path / "tk", epochs, TorchkeepCheckpointIO(), "last", width=width)
    fit(tmp_path / "pt", half, width=width)
    resumed_pt = fit(tmp_path / "pt", epochs, None, "last", width=width)
    straight = fit(tmp_path / "straight", epochs, width=width)
    assert_same(weights(resumed_tk), weights(resumed_pt))
    assert_same(weights(resumed_tk), weights(straight))
    last = torchkeep.load(tmp_path / "tk" / "ckpt" / "last.ckpt")
    assert last["epoch"] == epochs - 1


@pytest.mark.parametrize("mode", ["own", "lightning-wrapper"])
def test_async_saves_resume_exactly(tmp_path, mode: str) -> None:
    def plugin():
        if mode == "own":
            return TorchkeepCheckpointIO(async_save=True)
        return AsyncCheckpointIO(TorchkeepCheckpointIO())

    resumed = {}
    for name, make in (("a", plugin), ("native", TorchCheckpointIO)):
        fit(tmp_path / name, 2, make(), every_n_train_steps=1)  # removes the previous each step
        resumed[name] = fit(tmp_path / name, 4, make(), "last", every_n_train_steps=1)
    assert torchkeep.verify(str(tmp_path / "a" / "ckpt" / "last.ckpt")) == []
    straight = fit(tmp_path / "b", 4, TorchCheckpointIO())
    assert_same(weights(resumed["a"]), weights(straight))
    if mode == "own":  # the same files survive Lightning's removals as with its own sync IO
        assert sorted(os.listdir(tmp_path / "a" / "ckpt")) == sorted(
            os.listdir(tmp_path / "native" / "ckpt")
        )
    # (Lightning's wrapper removes on the main thread while saves wait in its executor, so it
    # leaves superseded files behind with its own TorchCheckpointIO as well)
    for name in os.listdir(tmp_path / "a" / "ckpt"):
        assert torchkeep.verify(str(tmp_path / "a" / "ckpt" / name)) == [], name


class Opaque:
    """A picklable object (module level): Lightning keeps it in hyper_parameters."""


def test_object_hyper_parameter_is_refused_naming_the_key(tmp_path) -> None:
    plugin = TorchkeepCheckpointIO()
    torch.manual_seed(0)
    model = Tiny(note=Opaque())
    trainer = L.Trainer(
        max_epochs=1,
        plugins=[plugin],
        default_root_dir=str(tmp_path),
        callbacks=[ModelCheckpoint(dirpath=str(tmp_path / "ckpt"))],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with pytest.raises(torchkeep.UnsupportedValueError) as info, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, loader())
    message = str(info.value)
    assert "'hyper_parameters'" in message and "hyper_parameters.note" in message
    assert "save_hyperparameters(ignore=" in message
    assert not os.path.exists(tmp_path / "ckpt") or not os.listdir(tmp_path / "ckpt")


def test_remove_checkpoint_is_atomic_and_waits_for_async(tmp_path) -> None:
    plugin = TorchkeepCheckpointIO(async_save=True)
    path = tmp_path / "x.ckpt"
    plugin.save_checkpoint({"w": torch.ones(1000)}, path)
    plugin.remove_checkpoint(path)  # waits for the background write, then removes
    assert os.listdir(tmp_path) == []
    plugin.remove_checkpoint(path)  # already gone: nothing to do
    plugin.teardown()
    with pytest.raises(torchkeep.CheckpointNotFoundError):
        plugin.load_checkpoint(path)
    with pytest.raises(TypeError):
        plugin.save_checkpoint({"w": torch.ones(1)}, path, storage_options={"x": 1})


def test_background_save_error_is_raised_not_dropped(tmp_path) -> None:
    plugin = TorchkeepCheckpointIO(async_save=True)
    occupied = tmp_path / "occupied.ckpt"
    (occupied / "inside").mkdir(parents=True)  # a folder where the file should go
    plugin.save_checkpoint({"w": torch.ones(10)}, occupied)  # fails in the background
    with pytest.raises(OSError):
        plugin.save_checkpoint({"w": torch.ones(10)}, tmp_path / "next.ckpt")
    plugin.save_checkpoint({"w": torch.ones(10)}, tmp_path / "next.ckpt")
    plugin.teardown()
    assert torch.equal(torchkeep.load(tmp_path / "next.ckpt")["w"], torch.ones(10))


def test_fabric_save_and_load_through_the_plugin(tmp_path) -> None:
    fabric = L.Fabric(accelerator="cpu", devices=1, plugins=[TorchkeepCheckpointIO()])
    torch.manual_seed(0)
    model, opt = fabric.setup(nn.Linear(3, 2), torch.optim.SGD(nn.Linear(3, 2).parameters(), 0.1))
    path = tmp_path / "fabric.ckpt"
    fabric.save(path, {"model": model, "step": 3})
    with torchkeep.open_file(path) as reader:
        assert reader.is_torchkeep
    other = fabric.setup(nn.Linear(3, 2))
    remainder = fabric.load(path, {"model": other})
    assert remainder == {"step": 3} and torch.equal(other.weight, model.weight)


def test_standalone_pytorch_lightning_package(tmp_path) -> None:
    pl = pytest.importorskip("pytorch_lightning")
    from torchkeep.integrations.pytorch_lightning import TorchkeepCheckpointIO as PlugIn

    class PlTiny(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Linear(4, 1)

        def training_step(self, batch, _index):
            return nn.functional.mse_loss(self.net(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    def run(epochs: int, ckpt_path=None) -> PlTiny:
        torch.manual_seed(0)
        model = PlTiny()
        trainer = pl.Trainer(
            max_epochs=epochs,
            plugins=[PlugIn()],
            default_root_dir=str(tmp_path),
            callbacks=[pl.callbacks.ModelCheckpoint(dirpath=str(tmp_path / "ck"), save_last=True)],
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.fit(model, loader(), ckpt_path=ckpt_path)
        return model

    run(1)
    with torchkeep.open_file(tmp_path / "ck" / "last.ckpt") as reader:
        assert reader.is_torchkeep
    resumed = run(2, "last")
    assert torchkeep.load(tmp_path / "ck" / "last.ckpt")["epoch"] == 1
    assert resumed.trainer.global_step == 8
