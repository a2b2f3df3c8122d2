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


def describe_os_error(exc: OSError, action: str, path: str) -> StorageError:
    """Turn an ``OSError`` into a :class:`StorageError` that says what to do."""
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
    err = StorageError(
        f"{action} {path!r} failed: {hint}. Nothing was committed; any previous checkpoint "
        "at that path is untouched."
    )
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
        raise describe_os_error(exc, "making the directory entry durable for", target) from exc


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
    file_ops.fsync_dir(tmp_dir)
    if os.path.lexists(target):
        raise StorageError(f"cannot commit {target!r}: it already exists; steps are immutable")
    try:
        file_ops.replace(tmp_dir, target)
    except OSError as exc:
        raise describe_os_error(exc, "committing", target) from exc
    file_ops.fsync_dir(os.path.dirname(os.path.abspath(target)))


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
    removed = []
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
