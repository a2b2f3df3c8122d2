"""Save and restore an ``accelerate.Accelerator``'s training state as torchkeep files.

``accelerator.save_state`` writes model weights as safetensors but optimizer, scheduler, scaler
and RNG state as pickles. :func:`save_state` writes all of it as one atomic, checksummed,
pickle-free torchkeep file; :func:`load_state` restores it in place, with the same key and shape
checks as :func:`torchkeep.load_checkpoint`::

    model, opt, loader, sched = accelerator.prepare(model, opt, loader, sched)
    ...
    torchkeep.integrations.accelerate.save_state(accelerator, "ckpt/state.tk")
    ...
    torchkeep.integrations.accelerate.load_state(accelerator, "ckpt/state.tk")

Covered: every prepared model (unwrapped, so keys carry no ``module.`` prefix), optimizer and
scheduler, objects passed to ``accelerator.register_for_checkpointing``, the gradient scaler,
``accelerator.step`` and the RNG state (Python, NumPy, torch CPU and CUDA). In a multi-process
run the main process writes ``path``; every other process writes only its own RNG state to
``path.rank<N>`` (models and optimizers are replicated in data-parallel runs; sharded FSDP or
DeepSpeed state is not handled here and is refused).
"""

from __future__ import annotations

import os
from typing import Any

from accelerate import Accelerator
from accelerate.utils import DistributedType

from .. import TorchkeepError, load_checkpoint, save_checkpoint

_SHARDED = {"FSDP", "DEEPSPEED", "MEGATRON_LM", "XLA"}


def training_state(accelerator: Accelerator) -> dict[str, Any]:
    """The name -> object mapping torchkeep captures for ``accelerator`` (models unwrapped)."""
    kind = getattr(accelerator.distributed_type, "name", str(accelerator.distributed_type))
    if kind in _SHARDED:
        raise TorchkeepError(
            f"torchkeep.integrations.accelerate: {kind} shards model and optimizer state across "
            "processes; use accelerator.save_state for it, or torchkeep.distributed for FSDP"
        )
    state: dict[str, Any] = {}
    for i, model in enumerate(accelerator._models):
        state[_name("model", i)] = accelerator.unwrap_model(model)
    for i, optimizer in enumerate(accelerator._optimizers):
        state[_name("optimizer", i)] = optimizer
    for i, scheduler in enumerate(accelerator._schedulers):
        state[_name("scheduler", i)] = scheduler
    for i, obj in enumerate(accelerator._custom_objects):
        state[f"custom_checkpoint_{i}"] = obj
    if accelerator.scaler is not None:
        state["scaler"] = accelerator.scaler
    state["step"] = int(accelerator.step)
    return state


def _name(base: str, index: int) -> str:
    return base if index == 0 else f"{base}_{index}"


def rank_path(path: str, process_index: int) -> str:
    """Where process ``process_index`` keeps its RNG state (the main process uses ``path``)."""
    return path if process_index == 0 else f"{path}.rank{process_index}"


def save_state(accelerator: Accelerator, path: str | os.PathLike) -> str:
    """Write the accelerator's training state to ``path`` (atomic; one file per process).

    Returns the file this process wrote. All processes must call it (it synchronizes them).
    """
    path = os.path.abspath(os.fspath(path))
    state = training_state(accelerator)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    mine = rank_path(path, accelerator.process_index)
    if accelerator.process_index == 0:
        save_checkpoint(mine, state)
    else:
        save_checkpoint(mine, {})  # RNG state only: the rest is the same on every process
    accelerator.wait_for_everyone()
    return mine


def load_state(accelerator: Accelerator, path: str | os.PathLike) -> dict[str, Any]:
    """Restore what :func:`save_state` wrote into the prepared objects, in place.

    ``accelerator.step`` is set back too. Every entry is checked (names, shapes, optimizer
    parameter counts) before anything changes; a mismatch raises
    :class:`torchkeep.StateDictMismatchError`, a corrupt file :class:`torchkeep.CorruptionError`.
    Returns the restored mapping.
    """
    path = os.path.abspath(os.fspath(path))
    state = training_state(accelerator)
    main_rng = accelerator.process_index == 0
    load_checkpoint(path, state, rng=main_rng)
    if not main_rng:
        load_checkpoint(rank_path(path, accelerator.process_index), {})
    accelerator.step = state["step"]
    if accelerator.distributed_type != DistributedType.NO:
        accelerator.wait_for_everyone()
    return state
