"""The torchkeep exception hierarchy.

Every error torchkeep raises on purpose derives from :class:`TorchkeepError`, so callers can
catch one type. Messages say what was wrong, where (file, key) and what to do next.
"""

from __future__ import annotations


class TorchkeepError(Exception):
    """Base class of every error torchkeep raises on purpose."""


class FormatError(TorchkeepError):
    """A file is malformed, truncated, hostile, or not in a format torchkeep can read."""


class UnsafePathError(FormatError):
    """A checkpoint directory names something outside itself or not a plain file.

    A symbolic link where a regular file is expected, a FIFO or device, or a file name with a
    path separator taken from an index: torchkeep refuses instead of following it.
    """


class CorruptionError(TorchkeepError):
    """Stored content does not match its checksum (bit rot, torn write, tampering)."""


ChecksumError = CorruptionError
"""Another name for :class:`CorruptionError`, the name users search for."""


class UnsafeFileError(TorchkeepError):
    """A pickle-based file needs globals outside the weights-only allow-list.

    ``globals`` lists the ``module.name`` references found by static analysis (nothing was run).
    """

    def __init__(self, message: str, globals: list[str] | None = None) -> None:
        super().__init__(message)
        self.globals = list(globals or [])


class UnsupportedValueError(TorchkeepError):
    """A value cannot be stored safely; raised before any byte is written."""


class StateDictMismatchError(TorchkeepError):
    """Checkpoint keys, shapes or dtypes do not fit the live object.

    ``report`` holds the full :class:`torchkeep.LoadReport`.
    """

    def __init__(self, message: str, report: object | None = None) -> None:
        super().__init__(message)
        self.report = report


class CheckpointNotFoundError(TorchkeepError, FileNotFoundError):
    """A path or a requested step does not exist."""


class LockError(TorchkeepError):
    """Another process holds the write lock of a checkpoint directory."""


class StorageError(TorchkeepError, OSError):
    """An I/O operation failed (disk full, permission, I/O error); nothing was committed."""


class ClassNotAllowedError(TorchkeepError):
    """A saved model names a class that the caller has not allowed to be resolved."""


class RemoteStorageError(StorageError):
    """An object store (an fsspec URL such as ``s3://``) failed; nothing was committed."""


class StorageUnavailableError(RemoteStorageError):
    """The store did not answer or kept refusing (network down, throttled) after retries."""


class StorageAuthError(RemoteStorageError):
    """The store refused the credentials (missing, wrong or expired)."""


class BucketNotFoundError(RemoteStorageError):
    """The bucket (or container) named in a URL does not exist."""


class DistributedCheckpointError(TorchkeepError):
    """A multi-process save or load failed on one or more ranks; every rank raises this.

    ``failures`` maps each failed rank to a one-line description of its error (empty when the
    failure was a broken collective, e.g. a rank that died, and no rank could report).
    """

    def __init__(self, message: str, failures: dict[int, str] | None = None) -> None:
        super().__init__(message)
        self.failures = dict(failures or {})


class SnapshotRaceError(TorchkeepError):
    """A tensor changed in place while an overlapped snapshot (``snapshot="overlap"``) was
    copying it; the step was not written (docs/performance.md lists what the guard sees)."""
