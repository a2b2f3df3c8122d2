"""An exclusive writer lock on a checkpoint directory.

Two processes saving steps into one run directory would race on retention and step names, so a
writer holds ``fcntl.flock`` on ``<directory>/.torchkeep.lock``. The kernel drops the lock when
the holder dies (even by SIGKILL), so a crashed run never leaves a stale lock behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator

from ..errors import LockError
from .paths import open_regular

LOCK_NAME = ".torchkeep.lock"


class DirLock:
    """Non-blocking exclusive lock of one directory; ``acquire`` raises :class:`LockError`."""

    def __init__(self, directory: str) -> None:
        self.directory = os.path.abspath(directory)
        self.path = os.path.join(self.directory, LOCK_NAME)
        self._fd = -1

    @property
    def held(self) -> bool:
        return self._fd >= 0

    def acquire(self) -> None:
        """Take the lock now or raise :class:`LockError` naming the holder's pid."""
        if self.held:
            return
        # Never through a link: a lock file planted as a symlink would make us truncate its
        # target (any file the user can write).
        fd = open_regular(self.path, os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise LockError(
                f"{self.directory}: another process{holder} is writing checkpoints into this "
                "directory; use a different directory, or stop that process first"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        """Drop the lock (closing the descriptor releases the flock)."""
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)

    def __enter__(self) -> DirLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read_holder(fd: int) -> str:
    with contextlib.suppress(OSError, ValueError):
        pid = int(os.pread(fd, 32, 0).decode().strip())
        return f" (pid {pid})"
    return ""


@contextlib.contextmanager
def locked(directory: str) -> Iterator[DirLock]:
    """Hold the writer lock of ``directory`` for the duration of the block."""
    lock = DirLock(directory)
    with lock:
        yield lock
