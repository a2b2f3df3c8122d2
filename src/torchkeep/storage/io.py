"""The small file-operation interface every torchkeep write goes through.

Routing writes, fsyncs, renames and deletes through one object lets the fault-injection tests
crash or fail the process at any chosen operation, and record the sequence of operations to
replay simulated power losses. Production code uses :data:`DEFAULT_OPS`; tests swap in a
subclass with :func:`use_ops`.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import sys
from collections.abc import Iterator

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]


class FileOps:
    """POSIX file operations used by the storage layer. Subclass to inject faults."""

    def open_new(self, path: str) -> int:
        """Create ``path`` exclusively for writing and return its descriptor."""
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
        return os.open(path, flags, 0o644)

    def preallocate(self, fd: int, size: int) -> None:
        """Reserve ``size`` bytes so a full disk fails early; silently skipped where unsupported."""
        if size > sys.maxsize:  # no file can be this large (a hostile or absurd size hint)
            raise OSError(errno.EFBIG, f"cannot reserve {size} bytes: larger than any file")
        if size <= 0 or not hasattr(os, "posix_fallocate"):
            return
        try:
            os.posix_fallocate(fd, 0, size)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                raise

    def pwrite(self, fd: int, data: memoryview, offset: int) -> int:
        """Write some of ``data`` at ``offset``; returns the count (may be short)."""
        return os.pwrite(fd, data, offset)

    def pwritev(self, fd: int, views: list, offset: int) -> int:
        """Write ``views`` back to back at ``offset`` in one call; returns the count (may be short).

        A subclass that intercepts :meth:`pwrite` (a fault injector) sees a vectored write as
        one ``pwrite`` of the joined bytes, so overriding ``pwrite`` alone covers every write.
        """
        if type(self).pwrite is not FileOps.pwrite or not hasattr(os, "pwritev"):
            return self.pwrite(fd, memoryview(b"".join(views)), offset)
        return os.pwritev(fd, views, offset)

    def set_direct(self, fd: int, enable: bool) -> bool:
        """Switch ``fd`` to (or back from) direct I/O, which bypasses the page cache.

        Returns False, changing nothing, where the OS or the filesystem has no direct I/O
        (macOS, tmpfs on older kernels, some FUSE mounts): callers then write buffered.
        """
        flag = getattr(os, "O_DIRECT", 0)
        if not flag or fcntl is None:
            return False
        try:
            flags = fcntl.fcntl(fd, fcntl.F_GETFL)
            fcntl.fcntl(fd, fcntl.F_SETFL, (flags | flag) if enable else (flags & ~flag))
        except OSError:
            return False
        return True

    def truncate(self, fd: int, size: int) -> None:
        """Cut (or extend) the file to ``size`` bytes."""
        os.ftruncate(fd, size)

    def fsync(self, fd: int) -> None:
        os.fsync(fd)

    def close(self, fd: int) -> None:
        os.close(fd)

    def replace(self, src: str, dst: str) -> None:
        """Atomically move ``src`` onto ``dst`` (same filesystem)."""
        os.replace(src, dst)

    def fsync_dir(self, path: str) -> None:
        """Make a directory's entries (creations, renames, deletions) durable."""
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def unlink(self, path: str) -> None:
        os.unlink(path)

    def mkdir(self, path: str) -> None:
        os.mkdir(path)

    def rmtree(self, path: str) -> None:
        shutil.rmtree(path)


def write_all(ops: FileOps, fd: int, data: memoryview, offset: int) -> None:
    """Write every byte of ``data`` at ``offset``, resuming after short writes and EINTR."""
    view = data.cast("B") if data.format != "B" or data.ndim != 1 else data
    done = 0
    total = view.nbytes
    while done < total:
        try:
            written = ops.pwrite(fd, view[done:], offset + done)
        except InterruptedError:
            continue
        if written <= 0:
            raise OSError(errno.EIO, "write made no progress")
        done += written


def writev_all(ops: FileOps, fd: int, views: list, offset: int) -> None:
    """Write every buffer of ``views`` (non-empty, contiguous memoryviews or NumPy arrays) back
    to back at ``offset``, resuming after short writes."""
    pending = list(views)
    while pending:
        try:
            written = ops.pwritev(fd, pending, offset)
        except InterruptedError:
            continue
        if written <= 0:
            raise OSError(errno.EIO, "write made no progress")
        offset += written
        pending = skip_bytes(pending, written)


def skip_bytes(buffers: list, n: int) -> list:
    """What is left of ``buffers`` (back to back) after their first ``n`` bytes were
    transferred: the untouched buffers, the first one cut to its tail if it was done in part.
    Vectored reads and writes resume from here after a short transfer."""
    first = 0
    while first < len(buffers) and n >= buffers[first].nbytes:
        n -= buffers[first].nbytes
        first += 1
    rest = buffers[first:]
    if n:
        rest[0] = _bytes_of(rest[0])[n:]
    return rest


def _iov_max() -> int:
    try:
        return max(16, min(os.sysconf("SC_IOV_MAX"), 1024))
    except (AttributeError, ValueError, OSError):
        return 1024


#: Most buffers one ``preadv``/``pwritev`` call accepts here (Linux: 1024).
IOV_MAX = _iov_max()


def _bytes_of(buffer: object) -> memoryview:
    """A flat byte view of any contiguous buffer (a NumPy array, bytes, a memoryview)."""
    view = memoryview(buffer)  # type: ignore[arg-type]
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


DEFAULT_OPS = FileOps()
_current: FileOps = DEFAULT_OPS


def ops() -> FileOps:
    """The file operations in force (the default, or a test's injector)."""
    return _current


@contextlib.contextmanager
def use_ops(replacement: FileOps) -> Iterator[FileOps]:
    """Route every torchkeep file operation through ``replacement`` inside the block."""
    global _current
    previous, _current = _current, replacement
    try:
        yield replacement
    finally:
        _current = previous
