"""Hugging Face ``Trainer`` that keeps its training state in a torchkeep file, not pickles.

A stock ``checkpoint-N/`` folder holds ``optimizer.pt``, ``scheduler.pt``, ``rng_state.pth``
(and ``scaler.pt``) as pickles, plus ``training_args.bin``, a pickled ``TrainingArguments``.
With :class:`TorchkeepTrainer` (or :func:`torchkeep_trainer` applied to your own ``Trainer``
subclass) the folder instead holds ``training_state.tk``: optimizer, scheduler, scaler and RNG
state in one atomic, checksummed, pickle-free file, restored by
``trainer.train(resume_from_checkpoint=...)``; the arguments are kept as
``training_args.json``. Model weights stay ``model.safetensors``. Folders written by a stock
``Trainer`` still resume (the pickles are read as before).

The hooks are ``Trainer``'s checkpoint methods (``_save_optimizer_and_scheduler``,
``_save_scaler``, ``_save_rng_state`` and their ``_load_`` counterparts), overridden only for
plain single-device and data-parallel training; DeepSpeed, FSDP, XLA and SageMaker model
parallelism keep Trainer's own files.
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any

from transformers import Trainer
from transformers.utils import is_sagemaker_mp_enabled, is_torch_xla_available

from .. import load, save
from ..errors import TorchkeepError
from ..state.rng import capture_rng, restore_rng

STATE_FILE = "training_state.tk"
ARGS_JSON = "training_args.json"
ARGS_PICKLE = "training_args.bin"


if TYPE_CHECKING:  # the mixin is checked as the Trainer it is mixed into
    _MixinBase = Trainer
else:
    _MixinBase = object


class TorchkeepTrainerMixin(_MixinBase):
    """Mix into a ``transformers.Trainer`` subclass (before it) to checkpoint through torchkeep.

    ``pickle_free=False`` keeps ``training_args.bin`` next to ``training_args.json``.
    """

    def __init__(self, *args: Any, pickle_free: bool = True, **kwargs: Any) -> None:
        self.torchkeep_pickle_free = pickle_free
        self._torchkeep_pending: dict[str, Any] = {}
        super().__init__(*args, **kwargs)

    # -- which runs torchkeep handles ----------------------------------------------------------
    def _torchkeep_handles(self) -> bool:
        return not (
            getattr(self, "is_deepspeed_enabled", False)
            or getattr(self, "is_fsdp_enabled", False)
            or is_torch_xla_available()
            or is_sagemaker_mp_enabled()
        )

    def _torchkeep_files(self, folder: str) -> tuple[str, str]:
        """The shared state file and this process's RNG file (the same file on process 0)."""
        main = os.path.join(folder, STATE_FILE)
        index = self.args.process_index
        if self.args.world_size <= 1 or index == 0:
            return main, main
        return main, os.path.join(folder, f"rng_state_{index}.tk")

    # -- saving -------------------------------------------------------------------------------
    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if not self._torchkeep_handles():
            return super()._save_optimizer_and_scheduler(output_dir)
        if self.args.should_save:
            optimizer, scheduler = self._torchkeep_optimizer_and_scheduler()
            self._torchkeep_pending["optimizer"] = optimizer.state_dict()
            self._torchkeep_pending["scheduler"] = scheduler.state_dict()
        return None

    def _torchkeep_optimizer_and_scheduler(self) -> tuple[Any, Any]:
        """Trainer creates both before it saves or resumes; say so if that ever changes."""
        if self.optimizer is None or self.lr_scheduler is None:
            raise TorchkeepError(
                "the Trainer has no optimizer or no LR scheduler yet, so there is no training "
                "state to checkpoint; call trainer.train() (which creates both) first"
            )
        return self.optimizer, self.lr_scheduler

    def _save_scaler(self, output_dir: str) -> None:
        if not self._torchkeep_handles():
            return super()._save_scaler(output_dir)
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is not None and self.args.should_save:
            self._torchkeep_pending["scaler"] = scaler.state_dict()
        return None

    def _save_rng_state(self, output_dir: str) -> None:
        """Last of Trainer's state saves: writes the collected state as one torchkeep file."""
        if not self._torchkeep_handles():
            return super()._save_rng_state(output_dir)
        pending, self._torchkeep_pending = self._torchkeep_pending, {}
        main, mine = self._torchkeep_files(output_dir)
        os.makedirs(output_dir, exist_ok=True)
        if mine == main:
            save({**pending, "rng": capture_rng()}, main)
        else:
            save({"rng": capture_rng()}, mine)
        return None

    def _save(self, output_dir: str | None = None, state_dict: Any = None) -> None:
        super()._save(output_dir, state_dict=state_dict)
        folder = output_dir if output_dir is not None else self.args.output_dir
        if self.torchkeep_pickle_free and self.args.should_save and folder is not None:
            _replace_args_pickle(folder, self.args.to_json_string())

    # -- loading ------------------------------------------------------------------------------
    def _torchkeep_state(self, checkpoint: str | None, rng: bool = False) -> dict | None:
        if checkpoint is None or not self._torchkeep_handles():
            return None
        main, mine = self._torchkeep_files(checkpoint)
        path = mine if rng else main
        if not os.path.isfile(path):
            return None
        return load(path, map_location="cpu")

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        state = self._torchkeep_state(checkpoint)
        if state is None or "optimizer" not in state:
            return super()._load_optimizer_and_scheduler(checkpoint)
        optimizer, scheduler = self._torchkeep_optimizer_and_scheduler()
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        return None

    def _load_scaler(self, checkpoint: str | None) -> None:
        state = self._torchkeep_state(checkpoint)
        if state is None:
            return super()._load_scaler(checkpoint)
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is not None and "scaler" in state:
            scaler.load_state_dict(state["scaler"])
        return None

    def _load_rng_state(self, checkpoint: str | None) -> None:
        state = self._torchkeep_state(checkpoint, rng=True)
        if state is None or "rng" not in state:
            return super()._load_rng_state(checkpoint)
        restore_rng(state["rng"], f"{checkpoint}: rng")
        return None


def _replace_args_pickle(folder: str, text: str) -> None:
    """Write the arguments as JSON (atomically) and drop the pickled copy."""
    json.loads(text)  # it is JSON: refuse to write anything else
    tmp = os.path.join(folder, f".{ARGS_JSON}.tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, os.path.join(folder, ARGS_JSON))
    pickled = os.path.join(folder, ARGS_PICKLE)
    if os.path.lexists(pickled):
        os.unlink(pickled)


def torchkeep_trainer(cls: type[Trainer]) -> type[Trainer]:
    """``cls`` (a ``Trainer`` subclass, e.g. TRL's) checkpointing through torchkeep."""
    return type(f"Torchkeep{cls.__name__}", (TorchkeepTrainerMixin, cls), {})


class TorchkeepTrainer(TorchkeepTrainerMixin, Trainer):
    """``transformers.Trainer`` whose checkpoints keep optimizer/scheduler/RNG in torchkeep."""
