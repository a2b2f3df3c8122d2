"""The storage backend interface, its commit strategies, and the local-disk backend.

Everything above ``storage/`` that lists, writes, reads or deletes the files of a run directory
goes through a :class:`Backend`, so another store (object storage through fsspec) can stand in
for the local disk without the layers above changing.

Call order for one committed unit (a manager step):

1. ``staged = backend.stage(target)``: a private place to assemble ``target``;
2. ``backend.write_file(staged/name, size, fill)`` for each file, each one complete and durable
   when the call returns;
3. ``backend.commit(staged, target)``: the one step that makes ``target`` visible, all or
   nothing; on any error before it, ``backend.abandon(staged)`` (``target`` never appears).

Readers call ``backend.list(directory)`` and ``backend.read_into(path, ranges)``; retention
calls ``backend.delete(path)``, which hides the unit before removing its bytes.

How a commit is made visible is a :class:`CommitStrategy` the backend delegates to: the local
disk renames a fully fsynced temporary directory into place (:class:`RenameCommit`); a store
without atomic rename writes a marker last instead. The local backend keeps every fast path of
:mod:`torchkeep.storage.local` and :mod:`torchkeep.storage.io` (``O_DIRECT``, ``pwritev``,
``preadv``, fsyncs); the fault-injection tests still see every operation through ``ops()``.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from .. import knobs
from ..errors import StorageError
from .io import FileOps, ops, write_all
from .local import atomic_file, commit_dir, discard_dir, make_temp_dir
from .paths import open_regular

#: Writes one file's bytes through ``ops`` into the open descriptor (``pwrite``/``pwritev``
#: at offsets; the descriptor may be switched to direct I/O). Called once per file.
Fill = Callable[[int, FileOps], None]


class Payload(Protocol):
    """One file's bytes, written either way a store needs them.

    ``fill`` writes at offsets into an open descriptor (local disks: ``pwritev``, direct I/O);
    ``chunks`` yields the bytes in file order (object stores: a streamed multipart upload);
    it may be iterated again to retry an upload.
    """

    size: int

    def fill(self, fd: int, file_ops: FileOps) -> None:
        """Write all ``size`` bytes into ``fd`` through ``file_ops``."""

    def chunks(self) -> Iterator[memoryview]:
        """The ``size`` bytes in order, as buffers (no copy where the bytes already exist)."""


class BytesPayload:
    """A small file held in memory (``meta.json``, a commit marker)."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.size = len(data)

    def fill(self, fd: int, file_ops: FileOps) -> None:
        write_all(file_ops, fd, memoryview(self.data), 0)

    def chunks(self) -> Iterator[memoryview]:
        yield memoryview(self.data)


class LocalFilePayload:
    """A committed local file streamed in order, one reused buffer of ``REMOTE_PART_BYTES``.

    Each yielded view is valid until the next one is requested (uploads copy or send it first).
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.size = os.path.getsize(path)

    def fill(self, fd: int, file_ops: FileOps) -> None:
        raise NotImplementedError("LocalFilePayload only streams (chunks)")

    def chunks(self) -> Iterator[memoryview]:
        piece = max(1, knobs.REMOTE_PART_BYTES)
        buf = bytearray(min(piece, max(1, self.size)))
        flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
        fd = os.open(self.path, flags)
        try:
            at = 0
            while at < self.size:
                view = memoryview(buf)[: min(len(buf), self.size - at)]
                _pread_exact(fd, self.path, view, at)
                yield view
                at += view.nbytes
        finally:
            os.close(fd)


@dataclass(frozen=True)
class Listed:
    """One entry of a listing: name, kind (``"file"``, ``"dir"`` or ``"other"``), size, mtime."""

    name: str
    kind: str
    size: int
    mtime: float


class CommitStrategy(Protocol):
    """How a unit assembled in private becomes visible: all or nothing."""

    def stage(self, target: str) -> str:
        """Create and return the private place where ``target`` is assembled."""

    def commit(self, staged: str, target: str) -> None:
        """Make the fully written ``staged`` visible as ``target`` (which must not exist)."""

    def abandon(self, staged: str) -> None:
        """Remove a staged unit that will never be committed."""


class Backend(Protocol):
    """Where checkpoint bytes live. See the module docstring for the call order."""

    def write_file(self, path: str, size: int, fill: Fill) -> None:
        """Create ``path`` (``size`` bytes, written by ``fill``) atomically and durably."""

    def write_payload(self, path: str, payload: Payload) -> None:
        """Create ``path`` from ``payload`` atomically and durably (the store picks the way)."""

    def read_into(self, path: str, ranges: Sequence[tuple[int, memoryview]]) -> None:
        """Fill each writable buffer with the bytes of ``path`` at its offset (exactly)."""

    def committed(self, path: str, entries: list[Listed]) -> bool:
        """Whether the unit at ``path`` (listed as ``entries``) is committed and complete."""

    def list(self, directory: str) -> list[Listed]:
        """Entries of ``directory`` sorted by name; FileNotFoundError when it does not exist."""

    def delete(self, path: str) -> None:
        """Remove a committed unit: hidden from listings first, then its bytes removed."""

    def stage(self, target: str) -> str:
        """Private place to assemble ``target`` (delegates to the commit strategy)."""

    def commit(self, staged: str, target: str) -> None:
        """Make ``staged`` visible as ``target`` (delegates to the commit strategy)."""

    def abandon(self, staged: str) -> None:
        """Drop ``staged`` after a failure (delegates to the commit strategy)."""


class RenameCommit:
    """Local commit: a temporary directory, fsynced, renamed into place, parent fsynced."""

    def stage(self, target: str) -> str:
        return make_temp_dir(target)

    def commit(self, staged: str, target: str) -> None:
        commit_dir(staged, target)

    def abandon(self, staged: str) -> None:
        if os.path.isdir(staged):
            ops().rmtree(staged)


class LocalBackend:
    """A local (or locally mounted) filesystem, with today's direct-I/O and fsync paths."""

    def __init__(self, commit: CommitStrategy | None = None) -> None:
        self.strategy: CommitStrategy = commit if commit is not None else RenameCommit()

    def write_file(self, path: str, size: int, fill: Fill) -> None:
        with atomic_file(path, size) as fd:
            fill(fd, ops())

    def write_payload(self, path: str, payload: Payload) -> None:
        self.write_file(path, payload.size, payload.fill)

    def committed(self, path: str, entries: list[Listed]) -> bool:
        return True  # a unit appears only by the rename that commits it

    def read_into(self, path: str, ranges: Sequence[tuple[int, memoryview]]) -> None:
        fd = open_regular(path)
        try:
            for offset, buffer in ranges:
                _pread_exact(fd, path, memoryview(buffer).cast("B"), offset)
        finally:
            os.close(fd)

    def list(self, directory: str) -> list[Listed]:
        out = []
        with os.scandir(directory) as it:
            for entry in it:
                try:
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue  # removed while we listed
                kind = (
                    "file"
                    if stat.S_ISREG(st.st_mode)
                    else "dir"
                    if stat.S_ISDIR(st.st_mode)
                    else "other"
                )
                out.append(Listed(entry.name, kind, st.st_size, st.st_mtime))
        return sorted(out, key=lambda e: e.name)

    def delete(self, path: str) -> None:
        discard_dir(path)

    def stage(self, target: str) -> str:
        return self.strategy.stage(target)

    def commit(self, staged: str, target: str) -> None:
        self.strategy.commit(staged, target)

    def abandon(self, staged: str) -> None:
        self.strategy.abandon(staged)


def _pread_exact(fd: int, path: str, view: memoryview, offset: int) -> None:
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n <= 0:
            raise StorageError(
                f"{path}: file ends at byte {offset + done}, expected {len(view) - done} more "
                "bytes; the file is truncated"
            )
        done += n


LOCAL = LocalBackend()
