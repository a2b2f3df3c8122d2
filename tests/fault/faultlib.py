"""Fault-injection helpers: a FileOps that records, crashes, fails or misbehaves on demand.

``FaultOps`` counts every operation torchkeep's storage layer performs (in the order they
happen; writer threads are serialized by a lock) and can, at a chosen operation number,
``os._exit`` the process (a crash), raise an ``OSError`` with a chosen errno, or keep the
written bytes so :mod:`powerloss` can replay the save into simulated power-loss states.
"""

from __future__ import annotations

import errno
import mmap
import os
import threading
from dataclasses import dataclass, field
from typing import Any

from torchkeep.storage.io import FileOps

CRASH_EXIT = 77
KINDS = (
    "open_new",
    "preallocate",
    "pwrite",
    "truncate",
    "fsync",
    "close",
    "replace",
    "fsync_dir",
    "unlink",
    "mkdir",
    "rmtree",
)


@dataclass
class FaultOps(FileOps):
    """A FileOps that logs operations and injects one fault at operation ``at`` (0-based).

    ``kinds`` restricts which operations are counted for ``at`` (all by default). ``action`` is
    ``"crash"`` (os._exit), ``"raise"`` (OSError(``err``)), or None (record only).
    ``max_write`` caps every pwrite (short writes); ``eintr`` makes every other pwrite raise
    InterruptedError first; ``keep_data`` stores written bytes in the log for replay.
    """

    at: int | None = None
    action: str | None = None
    err: int = errno.EIO
    kinds: tuple[str, ...] = KINDS
    max_write: int | None = None
    eintr: bool = False
    keep_data: bool = False
    no_prealloc: bool = False
    log: list[tuple] = field(default_factory=list)
    counted: int = 0
    fired: bool = False
    fired_kind: str | None = None

    def __post_init__(self) -> None:
        self._lock = threading.RLock()
        self._eintr_next = True

    # -- the hook run before every operation -------------------------------------------------
    def _step(self, kind: str, *record: Any) -> None:
        self.log.append((kind, *record))
        if kind not in self.kinds:
            return
        index = self.counted
        self.counted += 1
        if self.at is None or index != self.at or self.action is None:
            return
        self.fired = True
        self.fired_kind = kind
        if self.action == "crash":
            os._exit(CRASH_EXIT)
        raise OSError(self.err, f"injected {errno.errorcode.get(self.err, self.err)} at {kind}")

    def kinds_seen(self) -> list[str]:
        return [rec[0] for rec in self.log]

    # -- FileOps ---------------------------------------------------------------------------
    def open_new(self, path: str) -> int:
        with self._lock:
            self._step("open_new", path)
            fd = super().open_new(path)
            self.log[-1] = ("open_new", path, fd)
            return fd

    def preallocate(self, fd: int, size: int) -> None:
        with self._lock:
            self._step("preallocate", fd, size)
            if not self.no_prealloc:
                super().preallocate(fd, size)

    def pwrite(self, fd: int, data: memoryview, offset: int) -> int:
        with self._lock:
            if self.eintr:
                self._eintr_next = not self._eintr_next
                if not self._eintr_next:
                    raise InterruptedError(errno.EINTR, "injected EINTR")
            view = data if self.max_write is None else data[: self.max_write]
            self._step("pwrite", fd, offset, bytes(view) if self.keep_data else view.nbytes)
            written = super().pwrite(fd, view, offset)
            if self.keep_data and written != view.nbytes:
                self.log[-1] = ("pwrite", fd, offset, bytes(view[:written]))
            return written

    def truncate(self, fd: int, size: int) -> None:
        with self._lock:
            self._step("truncate", fd, size)
            super().truncate(fd, size)

    def fsync(self, fd: int) -> None:
        with self._lock:
            self._step("fsync", fd)
            super().fsync(fd)

    def close(self, fd: int) -> None:
        with self._lock:
            self._step("close", fd)
            super().close(fd)

    def replace(self, src: str, dst: str) -> None:
        with self._lock:
            self._step("replace", src, dst)
            super().replace(src, dst)

    def fsync_dir(self, path: str) -> None:
        with self._lock:
            self._step("fsync_dir", path)
            super().fsync_dir(path)

    def unlink(self, path: str) -> None:
        with self._lock:
            self._step("unlink", path)
            super().unlink(path)

    def mkdir(self, path: str) -> None:
        with self._lock:
            self._step("mkdir", path)
            super().mkdir(path)

    def rmtree(self, path: str) -> None:
        with self._lock:
            self._step("rmtree", path)
            super().rmtree(path)


def temps_in(directory: str) -> list[str]:
    """Temporary names (made by torchkeep.storage.local.temp_name) anywhere under ``directory``."""
    from torchkeep.storage.local import is_temp

    found = []
    for root, dirs, files in os.walk(directory):
        found += [os.path.join(root, n) for n in dirs + files if is_temp(n)]
    return found


IDLE, IN_SAVE, IO_BEGUN = 0, 1, 1


class PhaseOps(FileOps):
    """The real FileOps, plus a byte shared with the parent saying that a save's I/O has begun.

    ``flag`` is a shared anonymous ``mmap`` (it survives ``fork``). The child sets byte 0 to
    ``IN_SAVE`` before a save and back to ``IDLE`` after it returns; the save's first operation
    (creating its temporary file or step directory) sets byte 1 to ``IO_BEGUN``. After a
    SIGKILL the parent reads both: a kill that landed while byte 0 was ``IN_SAVE`` and byte 1
    ``IO_BEGUN`` interrupted a save between its first I/O and its return. Nothing else is
    wrapped, so the writer threads run exactly as without it (no lock, no log).
    """

    def __init__(self, flag: mmap.mmap) -> None:
        self.flag = flag

    def open_new(self, path: str) -> int:
        self.flag[1] = IO_BEGUN
        return super().open_new(path)

    def mkdir(self, path: str) -> None:
        self.flag[1] = IO_BEGUN
        super().mkdir(path)


def new_phase_flag() -> mmap.mmap:
    """A two-byte flag shared with forked children (anonymous mmaps are MAP_SHARED)."""
    return mmap.mmap(-1, 2)


def landed_mid_save(flag: mmap.mmap) -> bool:
    """True when the child was inside a save whose I/O had begun (see :class:`PhaseOps`)."""
    return flag[0] == IN_SAVE and flag[1] == IO_BEGUN
