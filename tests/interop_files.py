"""Checkpoints written by the real tools, built once per test session (shared by the CLI and
reader tests): torch.save (zip, legacy), safetensors, huggingface_hub shards, DCP, Lightning,
Accelerate, a torchkeep run directory, and hostile files that would run code if unpickled.
"""

from __future__ import annotations

import os
import pickle
import struct
import warnings
from typing import Any

import torch

_BUILT: dict[str, dict[str, str]] = {}
MARKER_NAME = "PWNED"


class Evil:
    """Unpickling this runs a shell command that creates a marker file."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))


def files(tmp_path_factory: Any) -> dict[str, str]:
    """Paths of every fixture checkpoint (built on first use)."""
    if "files" not in _BUILT:
        root = str(tmp_path_factory.mktemp("interop"))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _BUILT["files"] = _build(root)
    return _BUILT["files"]


def _build(root: str) -> dict[str, str]:
    import safetensors.torch
    from huggingface_hub import save_torch_state_dict

    import torchkeep

    p = {name: os.path.join(root, name) for name in (
        "model.tk", "model.safetensors", "zip.pt", "legacy.pt", "hf", "dcp", "acc", "run",
    )}  # fmt: skip
    p["marker"] = os.path.join(root, MARKER_NAME)
    sd = tiny_model().state_dict()
    ckpt = {"model_state": sd, "epoch": 3, "metrics": {"loss": 0.25}}
    torchkeep.save(ckpt, p["model.tk"])
    safetensors.torch.save_file(dict(sd), p["model.safetensors"])
    torch.save(ckpt, p["zip.pt"])
    torch.save(ckpt, p["legacy.pt"], _use_new_zipfile_serialization=False)
    os.makedirs(p["hf"])
    save_torch_state_dict(sd, p["hf"], max_shard_size=60)
    _dcp(sd, p["dcp"])
    _accelerate(p["acc"])
    p["lightning"] = _lightning(root)
    _run_dir(p["run"])
    _hostile(root, p)
    return p


def _dcp(sd: dict, path: str) -> None:
    import torch.distributed.checkpoint as dcp

    dcp.save({"model": sd, "step": 7}, checkpoint_id=path, no_dist=True)


def _accelerate(path: str) -> None:
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    model = tiny_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    accelerator.prepare(model, optimizer)
    accelerator.save_state(path)


def _lightning(root: str) -> str:
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    class Lit(L.LightningModule):
        def __init__(self, hidden: int = 3) -> None:
            super().__init__()
            self.save_hyperparameters()
            self.net = torch.nn.Linear(4, 2)

        def training_step(self, batch: Any, _i: int) -> torch.Tensor:
            x, y = batch
            loss = torch.nn.functional.mse_loss(self.net(x), y)
            self.log("train_loss", loss)
            return loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

    data = torch.utils.data.TensorDataset(torch.randn(8, 4), torch.randn(8, 2))
    folder = os.path.join(root, "lit")
    trainer = L.Trainer(
        max_steps=2,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[ModelCheckpoint(dirpath=folder, monitor="train_loss")],
        accelerator="cpu",
        default_root_dir=root,
    )
    trainer.fit(Lit(), torch.utils.data.DataLoader(data, batch_size=4))
    (name,) = os.listdir(folder)
    return os.path.join(folder, name)


def _run_dir(path: str) -> None:
    from torchkeep.manager import CheckpointManager

    model = tiny_model()
    with CheckpointManager(path, rng=False) as manager:
        for step, loss in ((10, 0.9), (20, 0.5), (30, 0.7)):
            manager.save(step, {"model": model}, metrics={"val_loss": loss})


def _hostile(root: str, p: dict[str, str]) -> None:
    p["evil.pt"] = os.path.join(root, "evil.pt")
    torch.save({"w": torch.ones(2), "x": Evil(p["marker"])}, p["evil.pt"])
    p["evil_legacy.pt"] = os.path.join(root, "evil_legacy.pt")
    torch.save({"x": Evil(p["marker"])}, p["evil_legacy.pt"], _use_new_zipfile_serialization=False)
    p["bad_header.safetensors"] = os.path.join(root, "bad_header.safetensors")
    with open(p["bad_header.safetensors"], "wb") as handle:  # length far past the file's end
        handle.write(struct.pack("<Q", 10**12) + b'{"a": 1}')
    p["bad_offsets.safetensors"] = os.path.join(root, "bad_offsets.safetensors")
    body = b'{"w":{"dtype":"F32","shape":[1000000],"data_offsets":[0,4000000]}}'
    with open(p["bad_offsets.safetensors"], "wb") as handle:
        handle.write(struct.pack("<Q", len(body)) + body + b"\0" * 8)
    p["evil_dcp"] = os.path.join(root, "evil_dcp")
    os.makedirs(p["evil_dcp"])
    with open(os.path.join(p["evil_dcp"], ".metadata"), "wb") as handle:
        pickle.dump(Evil(p["marker"]), handle)
    with open(os.path.join(p["evil_dcp"], "__0_0.distcp"), "wb") as handle:
        handle.write(b"\0" * 16)
    p["garbage"] = os.path.join(root, "garbage.bin")
    with open(p["garbage"], "wb") as handle:
        handle.write(b"\x13\x37 not a checkpoint at all")
    p["whole_model.pth"] = os.path.join(root, "whole_model.pth")
    torch.save(tiny_model(), p["whole_model.pth"])
