"""torchkeep: save, load and checkpoint PyTorch models safely, verifiably and fast."""

from .asyncsave import SaveHandle, save_async
from .checkpoint import load_checkpoint, save_checkpoint
from .engine import load, open_file, save, verify
from .errors import (
    CheckpointNotFoundError,
    ChecksumError,
    ClassNotAllowedError,
    CorruptionError,
    FormatError,
    LockError,
    StateDictMismatchError,
    StorageError,
    TorchkeepError,
    UnsafeFileError,
    UnsupportedValueError,
)
from .manager import CheckpointManager, StepInfo
from .model import convert_legacy, export_model, load_exported, load_model, save_model
from .state.module import load_state_dict
from .state.report import LoadReport

__version__ = "0.1.0"

__all__ = [
    "CheckpointManager",
    "SaveHandle",
    "StepInfo",
    "load_checkpoint",
    "save_async",
    "save_checkpoint",
    "CheckpointNotFoundError",
    "ChecksumError",
    "ClassNotAllowedError",
    "CorruptionError",
    "FormatError",
    "LoadReport",
    "LockError",
    "StateDictMismatchError",
    "StorageError",
    "TorchkeepError",
    "UnsafeFileError",
    "UnsupportedValueError",
    "load",
    "load_state_dict",
    "open_file",
    "save",
    "verify",
    "convert_legacy",
    "export_model",
    "load_exported",
    "load_model",
    "save_model",
]
