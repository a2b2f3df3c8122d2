"""Recognize a checkpoint's format from its content (not its extension)."""

from __future__ import annotations

import os
import re

from ..errors import CheckpointNotFoundError, FormatError, TorchkeepError
from ..storage.run_dir import META_FILE, STATE_FILE, list_steps
from ..storage.urls import backend_for, is_url, remote_backend_for
from .dcp_check import RANK_METADATA
from .dcp_safetensors import sharded_files

SAFETENSORS = "safetensors"
TORCH_ZIP = "torch-zip"
TORCH_LEGACY = "torch-legacy"
HF_SHARDED = "hf-sharded"
DCP = "dcp"
DCP_SAFETENSORS = "dcp-safetensors"
ACCELERATE = "accelerate"
HF_TRAINER = "hf-trainer"
RUN_DIR = "run-dir"
RUN_STEP = "run-step"

#: Files of an Accelerate ``save_state`` folder: model weights, and the state beside them.
#: (``adapter_model`` files: PEFT weights, also found in Trainer checkpoint folders.)
ACCELERATE_MODEL = re.compile(
    r"^((model|adapter_model)(_\d+)?\.safetensors|(pytorch_model|adapter_model)(_\d+)?\.bin)$"
)
ACCELERATE_STATE = re.compile(
    r"^(optimizer(_\d+)?\.bin|scheduler(_\d+)?\.bin|sampler(_\d+)?\.bin|scaler\.pt|"
    r"random_states_\d+\.pkl|custom_checkpoint_\d+\.pkl|dl_state_dict(_\d+)?\.bin)$"
)
#: A Hugging Face ``Trainer`` ``checkpoint-N/`` folder is recognized by this file.
TRAINER_STATE = "trainer_state.json"


def is_accelerate_folder(names: list[str]) -> bool:
    """An Accelerate folder holds model weights plus optimizer / RNG state files."""
    return any(ACCELERATE_MODEL.match(n) for n in names) and any(
        ACCELERATE_STATE.match(n) for n in names
    )


def is_trainer_folder(names: list[str]) -> bool:
    """A Hugging Face ``Trainer`` checkpoint folder: ``trainer_state.json`` is its mark."""
    return TRAINER_STATE in names


def is_run_dir(path: str) -> bool:
    """A torchkeep run directory: at least one committed step (storage/run_dir.py)."""
    try:
        return bool(list_steps(path, backend_for(path)))
    except (TorchkeepError, OSError):
        return False


def sniff_file(path: str) -> str:
    """Format name of a single file, judged by its first bytes."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(4096)
    except FileNotFoundError:
        raise CheckpointNotFoundError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise FormatError(f"{path}: is a directory, not a checkpoint file") from None
    if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
        return TORCH_ZIP
    if len(head) >= 9 and head[8:9] == b"{":
        return SAFETENSORS  # torchkeep files are safetensors files; FileReader tells them apart
    if head[:1] == b"\x80" or head[:1] in (b"(", b"}", b"]", b"c"):
        return TORCH_LEGACY
    raise FormatError(
        f"{path}: not a recognized checkpoint (not torchkeep, safetensors or torch.save); "
        f"first bytes {head[:8]!r}"
    )


def sniff_url(path: str) -> str:
    """Format of an object-store checkpoint: a torchkeep run directory, step or file."""
    backend = remote_backend_for(path)
    kind = backend.kind(path)
    if kind is None:
        raise CheckpointNotFoundError(f"{path}: no such object or prefix")
    if kind == "dir":
        if is_run_dir(path):
            return RUN_DIR
        names = [e.name for e in backend.list(path)]
        if STATE_FILE in names and META_FILE in names:
            return RUN_STEP
        raise FormatError(
            f"{path}: prefix is not a torchkeep run directory or step (on object stores only "
            "torchkeep run directories and single files are read)"
        )
    head = backend.read_range(path, 0, min(4096, backend.size(path)))
    if len(head) >= 9 and head[8:9] == b"{":
        return SAFETENSORS
    raise FormatError(
        f"{path}: not a torchkeep or safetensors file (other formats are read from local "
        "paths only; download it first)"
    )


def sniff(path: str | os.PathLike) -> str:
    """Format of a file or directory checkpoint."""
    path = os.fspath(path)
    if is_url(path):
        return sniff_url(path)
    if not os.path.lexists(path):
        raise CheckpointNotFoundError(f"{path}: no such file or directory")
    if os.path.isdir(path):
        return sniff_dir(path)
    return sniff_file(path)


def sniff_dir(path: str) -> str:
    """Format of a folder checkpoint, judged by the files it holds."""
    names = os.listdir(path)
    if is_trainer_folder(names):  # before HF_SHARDED: a Trainer folder may hold a sharded model
        return HF_TRAINER
    if sharded_files(path):  # stock DCP's safetensors layouts (chunk offsets in each header)
        return DCP_SAFETENSORS
    if "model.safetensors.index.json" in names:
        return HF_SHARDED
    if any(n.endswith(".distcp") for n in names) and (
        ".metadata" in names or any(RANK_METADATA.match(n) for n in names)
    ):
        return DCP
    if is_accelerate_folder(names):
        return ACCELERATE
    if is_run_dir(path):
        return RUN_DIR
    if "state.tk" in names and "meta.json" in names:
        return RUN_STEP  # one step folder of a run directory
    raise FormatError(
        f"{path}: folder is not a recognized checkpoint (expected a torchkeep run directory, "
        "a Hugging Face sharded folder with model.safetensors.index.json, a "
        "torch.distributed.checkpoint folder with .metadata, an Accelerate save_state folder or a "
        "Hugging Face Trainer checkpoint-N folder with trainer_state.json)"
    )
