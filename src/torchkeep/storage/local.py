"""Atomic, durable commits on a local filesystem.

A file is written under a temporary name in the target's directory, fsynced, renamed onto the
target with ``os.replace`` and the directory fsynced, so a crash at any moment leaves either the
old or the new content at the target. A directory (a manager step) is committed the same way:
its files are fsynced, then the temporary directory is renamed into place and the parent fsynced.

Temporaries carry the writer's host and pid in their name, so a later process can sweep the
ones whose writer is dead without touching a save that is still running.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import socket
from collections.abc import Iterator

from ..errors import StorageError
from .io import ops

TEMP_MARK = ".tk-tmp"
_TEMP_RE = re.compile(r"^\.(?P<name>.+)\.tk-tmp\.(?P<host>[^.]+)\.(?P<pid>\d+)\.[0-9a-f]+$")


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname()) or "host"


def temp_name(target: str) -> str:
    """Temporary path next to ``target``: ``.<name>.tk-tmp.<host>.<pid>.<random>``."""
    directory, name = os.path.split(os.path.abspath(target))
    suffix = f"{TEMP_MARK}.{_host()}.{os.getpid()}.{secrets.token_hex(4)}"
    return os.path.join(directory, f".{name}{suffix}")


def is_temp(name: str) -> bool:
    """True for names made by :func:`temp_name` (never a committed checkpoint)."""
    return _TEMP_RE.match(name) is not None


def describe_os_error(
    exc: OSError, action: str, path: str, after_commit: bool = False
) -> StorageError:
    """Turn an ``OSError`` into a :class:`StorageError` that says what to do.

    ``after_commit``: the rename already happened (only the directory fsync failed), so the new
    content is in place but may not survive a power loss.
    """
    hints = {
        errno.ENOSPC: "the disk is full; free space or save elsewhere",
        errno.EDQUOT: "the disk quota is exhausted; free space or save elsewhere",
        errno.EFBIG: "the file size limit was reached; raise the limit or save elsewhere",
        errno.EACCES: "permission denied; check the directory's permissions",
        errno.EPERM: "operation not permitted; check the directory's permissions",
        errno.EROFS: "the filesystem is read-only; save elsewhere",
        errno.EXDEV: "the temporary and target are on different filesystems",
        errno.EIO: "the device reported an I/O error; check the disk",
    }
    hint = hints.get(exc.errno or 0, exc.strerror or str(exc))
    outcome = (
        "The new content is in place but may not be durable; save again once the disk is healthy."
        if after_commit
        else "Nothing was committed; any previous checkpoint at that path is untouched."
    )
    err = StorageError(f"{action} {path!r} failed: {hint}. {outcome}")
    err.errno = exc.errno
    return err


@contextlib.contextmanager
def atomic_file(target: str, size_hint: int = 0) -> Iterator[int]:
    """Yield a descriptor of a temporary file that becomes ``target`` only if the block succeeds.

    On success: fsync file, close, rename onto ``target``, fsync directory. On any error the
    temporary is removed and ``target`` is untouched; ``OSError`` becomes :class:`StorageError`.
    """
    file_ops = ops()
    target = os.path.abspath(target)
    tmp = temp_name(target)
    try:
        fd = file_ops.open_new(tmp)
    except OSError as exc:
        raise describe_os_error(exc, "creating a temporary file for", target) from exc
    closed = False
    try:
        file_ops.preallocate(fd, size_hint)
        yield fd
        file_ops.fsync(fd)
        closed = True
        file_ops.close(fd)
        file_ops.replace(tmp, target)
    except BaseException as exc:
        _discard_file(fd, tmp, closed)
        if isinstance(exc, OSError) and not isinstance(exc, StorageError):
            raise describe_os_error(exc, "saving", target) from exc
        raise
    try:
        file_ops.fsync_dir(os.path.dirname(target))
    except OSError as exc:
        raise describe_os_error(
            exc, "making the directory entry durable for", target, after_commit=True
        ) from exc


def _discard_file(fd: int, tmp: str, closed: bool) -> None:
    file_ops = ops()
    if not closed:
        with contextlib.suppress(OSError):
            file_ops.close(fd)
    with contextlib.suppress(OSError):
        file_ops.unlink(tmp)


def commit_dir(tmp_dir: str, target: str) -> None:
    """Rename a fully written and fsynced directory into place, then fsync the parent.

    ``target`` must not exist (steps are immutable once committed).
    """
    file_ops = ops()
    try:
        file_ops.fsync_dir(tmp_dir)
    except OSError as exc:
        raise describe_os_error(exc, "making the files durable for", target) from exc
    if os.path.lexists(target):
        raise StorageError(f"cannot commit {target!r}: it already exists; steps are immutable")
    try:
        file_ops.replace(tmp_dir, target)
    except OSError as exc:
        raise describe_os_error(exc, "committing", target) from exc
    try:
        file_ops.fsync_dir(os.path.dirname(os.path.abspath(target)))
    except OSError as exc:
        raise describe_os_error(
            exc, "making the commit durable for", target, after_commit=True
        ) from exc


def discard_dir(path: str) -> None:
    """Delete a committed directory atomically: rename it to a temporary name, fsync, remove.

    After the rename no reader can list it; a crash before the removal leaves a temporary that
    :func:`sweep_temps` deletes later.
    """
    file_ops = ops()
    parent = os.path.dirname(os.path.abspath(path))
    trash = temp_name(path)
    try:
        file_ops.replace(path, trash)
    except OSError as exc:
        raise StorageError(f"deleting {path!r} failed ({exc}); it is still in place") from exc
    try:
        # Durable rename first: removing files of a step whose rename a power loss could undo
        # would resurrect a half-deleted step. On failure the trash waits for sweep_temps.
        file_ops.fsync_dir(parent)
        file_ops.rmtree(trash)
    except OSError as exc:
        raise StorageError(
            f"deleting {path!r} failed part-way ({exc}); it is no longer listed, and its "
            f"leftover {os.path.basename(trash)!r} is swept when the directory is next opened"
        ) from exc


def make_temp_dir(target: str) -> str:
    """Create the temporary directory in which ``target`` is assembled before its commit."""
    tmp = temp_name(target)
    try:
        ops().mkdir(tmp)
    except OSError as exc:
        raise describe_os_error(exc, "creating a temporary directory for", target) from exc
    return tmp


def writer_is_dead(name: str) -> bool:
    """True when a temporary's writer (same host) no longer runs; False when unknown or alive."""
    match = _TEMP_RE.match(name)
    if match is None or match["host"] != _host():
        return False
    pid = int(match["pid"])
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def sweep_temps(directory: str) -> list[str]:
    """Delete temporaries in ``directory`` left by dead writers; returns the removed paths."""
    removed: list[str] = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    for name in names:
        if not writer_is_dead(name):
            continue
        path = os.path.join(directory, name)
        with contextlib.suppress(OSError):
            if os.path.isdir(path) and not os.path.islink(path):
                ops().rmtree(path)
            else:
                ops().unlink(path)
            removed.append(path)
    if removed:
        with contextlib.suppress(OSError):
            ops().fsync_dir(directory)
    return removed
