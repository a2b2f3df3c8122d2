"""Hugging Face Trainer: a tiny model built from a config (no downloads) trained by a real
Trainer on CPU; its checkpoint-N folders read by torchkeep, and resumed through torchkeep."""

from __future__ import annotations

import json
import os
import warnings

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import torchkeep
from torchkeep.cli.main import cli as main_cli
from torchkeep.readers.open import open_view

transformers = pytest.importorskip("transformers")
from torchkeep.integrations.transformers import (  # noqa: E402
    TorchkeepTrainer,
    torchkeep_trainer,
)

PICKLES = {"optimizer.pt", "scheduler.pt", "rng_state.pth", "training_args.bin"}


def tiny_model(layers: int, width: int):
    config = transformers.GPT2Config(
        n_layer=layers, n_embd=width, n_head=2, vocab_size=64, n_positions=16
    )  # dropout stays on (0.1): resuming exactly needs the RNG state
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config)


def dataset(n: int) -> list[dict]:
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 64, (n, 12), generator=gen)
    return [{"input_ids": row, "labels": row} for row in ids]


def train(cls, out, steps: int, save_steps: int, resume=None, layers=1, width=16):
    args = transformers.TrainingArguments(
        output_dir=str(out),
        max_steps=steps,
        save_steps=save_steps,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        lr_scheduler_type="linear",
        report_to=[],
        use_cpu=True,
        logging_steps=1000,
        disable_tqdm=True,
        seed=5,
    )
    trainer = cls(model=tiny_model(layers, width), args=args, train_dataset=dataset(24))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train(resume_from_checkpoint=resume)
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_stock_trainer_folder_is_read_by_torchkeep(tmp_path) -> None:
    train(transformers.Trainer, tmp_path, 2, 2)
    folder = tmp_path / "checkpoint-2"
    assert set(os.listdir(folder)) >= PICKLES
    with open_view(folder) as view:
        assert view.format == "hf-trainer"
        assert "model.transformer.wte.weight" in view.refs
        assert any(n.startswith("optimizer.state.") for n in view.refs)
        assert view.values["trainer_state.global_step"] == 2
        (note,) = view.notes  # training_args.bin: listed as the pickle it is, not loaded
        assert note.startswith("training_args.bin: a pickle importing transformers.")
        assert view.check() == []
    with pytest.warns(UserWarning, match="training_args.bin: a pickle"):
        state = torchkeep.load(folder)  # RNG state included, without trusted=True
    name, keys, *_ = state["rng_state"]["numpy"]
    assert name == "MT19937" and keys.dtype == np.uint32 and keys.shape == (624,)
    assert state["rng_state"]["python"][0] == 3
    assert "training_args" not in state
    with pytest.raises(torchkeep.UnsafeFileError):
        torchkeep.load(folder / "training_args.bin")
    trusted = torchkeep.load(folder, trusted=True)
    assert isinstance(trusted["training_args"], transformers.TrainingArguments)
    torchkeep.load(folder / "rng_state.pth")  # the RNG pickle alone, too
    cli = CliRunner()
    done = cli.invoke(main_cli, ["convert", str(folder), str(tmp_path / "ck.tk")])
    assert done.exit_code == 0, done.output
    converted = torchkeep.load(tmp_path / "ck.tk")
    assert np.array_equal(converted["rng_state"]["numpy"][1], keys)
    wte = "transformer.wte.weight"
    assert torch.equal(converted["model"][wte], state["model"][wte])
    assert converted["trainer_state"] == state["trainer_state"]
    assert cli.invoke(main_cli, ["verify", str(folder)]).exit_code == 0
    scan = cli.invoke(main_cli, ["scan", str(folder), "--json"])
    assert scan.exit_code == 1  # training_args.bin: the only unsafe file
    assert {
        f["file"].rsplit("/", 1)[1]
        for f in json.loads(scan.output)["files"]
        if any(not g["allowed"] for g in f["globals"])
    } == {"training_args.bin"}


@pytest.mark.slow
def test_resume_through_torchkeep_is_exact(tmp_path, long_run: bool) -> None:
    steps, layers, width = (12, 2, 64) if long_run else (4, 1, 16)  # full form: make test-long
    half = steps // 2
    straight = train(TorchkeepTrainer, tmp_path / "a", steps, half, layers=layers, width=width)
    folder = tmp_path / "a" / f"checkpoint-{half}"
    names = set(os.listdir(folder))
    assert "training_state.tk" in names and "training_args.json" in names
    assert not names & PICKLES, names & PICKLES
    assert torchkeep.verify(folder / "training_state.tk") == []
    saved = torchkeep.load(folder / "training_state.tk")
    assert set(saved) == {"optimizer", "scheduler", "rng"}
    assert json.loads((folder / "training_args.json").read_text())["max_steps"] == steps
    with open_view(folder) as view:  # the folder itself reads as before, now without notes
        assert view.format == "hf-trainer" and not view.notes and view.check() == []
        assert "training_state.optimizer.state.0.exp_avg" in view.refs
        assert view.values["training_args.max_steps"] == steps
    resumed = train(
        TorchkeepTrainer, tmp_path / "b", steps, half, str(folder), layers=layers, width=width
    )
    assert_same(resumed, straight)
    native = train(transformers.Trainer, tmp_path / "c", steps, half, layers=layers, width=width)
    assert_same(native, straight)  # checkpointing through torchkeep changes nothing


def test_resume_needs_the_rng_state(tmp_path) -> None:
    """The exact-resume test above can fail: without the RNG state, dropout differs."""
    straight = train(TorchkeepTrainer, tmp_path / "a", 4, 2)
    folder = tmp_path / "a" / "checkpoint-2"
    state = torchkeep.load(folder / "training_state.tk")
    del state["rng"]
    torchkeep.save(state, folder / "training_state.tk")
    resumed = train(TorchkeepTrainer, tmp_path / "b", 4, 2, str(folder))
    assert any(not torch.equal(resumed[k], straight[k]) for k in straight)


def test_stock_folder_resumes_in_torchkeep_trainer_and_subclass_helper(tmp_path) -> None:
    straight = train(transformers.Trainer, tmp_path / "a", 4, 2)
    mixed = torchkeep_trainer(transformers.Trainer)
    assert mixed.__name__ == "TorchkeepTrainer" and issubclass(mixed, transformers.Trainer)
    resumed = train(mixed, tmp_path / "b", 4, 2, str(tmp_path / "a" / "checkpoint-2"))
    assert_same(resumed, straight)
