"""torchkeep: save, load and checkpoint PyTorch models safely, verifiably and fast.

Layers, lowest first (docs/architecture.md): ``format/`` encodes; ``storage/`` holds bytes
behind a small backend interface plus the run-directory layout; ``transfer/`` moves bytes
between tensors and storage; ``readers/`` open every checkpoint format; ``engine`` holds the
verbs; ``state/``, ``retention``, ``manager``, ``model/`` build on them; ``cli/`` is on top.
"""

from ._version import __version__ as __version__
from .checkpoint import load_checkpoint, save_checkpoint
from .engine import load, open_file, save, verify
from .errors import (
    BucketNotFoundError,
    CheckpointNotFoundError,
    ChecksumError,
    ClassNotAllowedError,
    CorruptionError,
    DistributedCheckpointError,
    FormatError,
    LockError,
    RemoteStorageError,
    SnapshotRaceError,
    StateDictMismatchError,
    StorageAuthError,
    StorageError,
    StorageUnavailableError,
    TorchkeepError,
    UnsafeFileError,
    UnsafePathError,
    UnsupportedValueError,
)
from .manager import CheckpointManager, StepInfo
from .model import convert_legacy, export_model, load_exported, load_model, save_model
from .state.module import load_state_dict
from .state.report import LoadReport
from .transfer.asyncsave import SaveHandle, save_async

__all__ = [
    "CheckpointManager",
    "SaveHandle",
    "StepInfo",
    "load_checkpoint",
    "save_async",
    "save_checkpoint",
    "BucketNotFoundError",
    "CheckpointNotFoundError",
    "ChecksumError",
    "ClassNotAllowedError",
    "CorruptionError",
    "DistributedCheckpointError",
    "FormatError",
    "LoadReport",
    "LockError",
    "SnapshotRaceError",
    "StateDictMismatchError",
    "RemoteStorageError",
    "StorageAuthError",
    "StorageError",
    "StorageUnavailableError",
    "TorchkeepError",
    "UnsafeFileError",
    "UnsafePathError",
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
