"""Write a file's tensor data with direct I/O through reused, aligned staging buffers.

The file's bytes are cut into aligned segments of ``DIRECT_CHUNK_BYTES``. The main thread walks
the entries in file order, hashing each and recording which pieces of tensor memory land in
which segment; a pool thread copies a full segment's pieces into a staging buffer and writes it
with one aligned ``pwrite``. The first segment holds the header, which is final only once every
checksum is known, so it is kept and written last; the last segment is padded to the alignment
and the file cut back to its length. The bytes on disk are exactly those of a buffered save.

Why: a buffered save copies every byte into a freshly allocated page-cache page. On VMs whose
host reclaims freed guest memory, faulting those pages in costs more than the disk write
(docs/performance.md), and on any machine the save evicts pages the training loop wanted.
"""

from __future__ import annotations

import errno
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from .. import knobs
from ..storage.aligned import STAGING, AlignedBuffer, align_up
from ..storage.io import FileOps, write_all
from . import checksum
from .layout import Entry
from .memory import byte_view, host_source, small_buffer

#: A piece of tensor memory: (offset in its segment, source address, byte count).
Piece = tuple[int, int, int]


def wants_direct(data_bytes: int) -> bool:
    """Whether a file with this much tensor data is written with direct I/O."""
    return bool(knobs.DIRECT_IO) and data_bytes >= max(1, knobs.DIRECT_MIN_BYTES)


class DirectWriter:
    """Stages and writes one file's bytes; see the module docstring for the order of work."""

    def __init__(self, fd: int, ops: FileOps, data_start: int, pool: ThreadPoolExecutor) -> None:
        self.fd, self.ops, self.pool = fd, ops, pool
        self.align = max(512, knobs.DIRECT_ALIGN)
        self.chunk = align_up(max(1, knobs.DIRECT_CHUNK_BYTES), self.align)
        self.data_start = data_start
        self.head = AlignedBuffer(align_up(data_start, self.align))  # header + first data bytes
        self.seg_start = self.head.size  # file offset of the segment being filled
        self.pieces: list[Piece] = []
        self.position = data_start  # file offset of the next byte
        self.pending: deque[Future] = deque()
        self.limit = max(2, 2 * knobs.IO_THREADS)
        self.keep_alive: list[Any] = []  # host copies of device tensors, alive until written
        self.direct_lock = threading.Lock()
        self.direct = True

    # -- main thread -------------------------------------------------------------------------
    def write_entry(self, entry: Entry, source: Any) -> str:
        """Stage ``entry``'s bytes (from the contiguous CPU tensor ``source``); return its hash."""
        if source is not entry.source:
            self.keep_alive.append(source)
        size = entry.end - entry.begin
        address = source.data_ptr()
        if size <= knobs.SMALL_TENSOR_BYTES:  # one call each: per-tensor cost matters here
            self._add(address, size)
            return checksum.digest(small_buffer(source))
        view = byte_view(source)
        hasher = checksum.new_hasher()
        step = max(1, knobs.CHUNK_BYTES)
        for lo in range(0, size, step):
            n = min(step, size - lo)
            self._add(address + lo, n)
            hasher.update(view[lo : lo + n])  # overlaps with the pool copying and writing
        return hasher.hexdigest()

    def _add(self, address: int, nbytes: int) -> None:
        if self.position < self.head.size:
            n = min(nbytes, self.head.size - self.position)
            self.head.copy_in(self.position, address, n)
            self.position += n
            address, nbytes = address + n, nbytes - n
        while nbytes:
            room = self.seg_start + self.chunk - self.position
            n = min(nbytes, room)
            self.pieces.append((self.position - self.seg_start, address, n))
            self.position += n
            address, nbytes = address + n, nbytes - n
            if n == room:
                self._submit_segment()

    def _submit_segment(self) -> None:
        length = self.position - self.seg_start  # negative when the data ended inside the head
        if length > 0:
            while len(self.pending) >= self.limit:
                self.pending.popleft().result()
            job = self.pool.submit(self._write_segment, self.seg_start, self.pieces, length)
            self.pending.append(job)
        self.seg_start, self.pieces = self.position, []

    def finish(self, header: Any) -> None:
        """Write the last segment, wait for all, then the head with the final ``header()``;
        cut the padding off and leave the descriptor buffered again."""
        self._submit_segment()
        while self.pending:
            self.pending.popleft().result()
        final = header()
        if len(final) != self.data_start:  # fixed-width fields make this impossible
            raise AssertionError("torchkeep header changed length between placeholder and final")
        self.head.view[: len(final)] = final
        self._write(self.head.view, 0)
        self.ops.truncate(self.fd, self.position)

    def abandon(self) -> None:
        for future in self.pending:
            future.cancel()

    # -- pool threads ------------------------------------------------------------------------
    def _write_segment(self, offset: int, pieces: list[Piece], length: int) -> None:
        buffer = STAGING.take(self.chunk)
        try:
            for at, address, n in pieces:
                buffer.copy_in(at, address, n)
            padded = align_up(length, self.align)
            buffer.zero(length, padded - length)
            self._write(buffer.view[:padded], offset)
        finally:
            STAGING.give(buffer, keep=max(1, knobs.IO_THREADS))

    def _write(self, view: memoryview, offset: int) -> None:
        """One aligned write; if the filesystem accepted O_DIRECT but refuses the write
        (EINVAL), the file falls back to buffered writes and this one is retried."""
        try:
            write_all(self.ops, self.fd, view, offset)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            self._fall_back()
            write_all(self.ops, self.fd, view, offset)

    def _fall_back(self) -> None:
        with self.direct_lock:
            if self.direct:
                self.direct = False
                self.ops.set_direct(self.fd, False)


def write_direct(entries: list[Entry], header: Any, fd: int, ops: FileOps) -> dict[str, str]:
    """Write ``entries`` and the header ``header(sums)`` returns with direct I/O; returns the
    checksums. The caller has switched ``fd`` to direct I/O and switches it back."""
    placeholder = header(None)
    sums: dict[str, str] = {}
    with ThreadPoolExecutor(max_workers=max(1, knobs.IO_THREADS)) as pool:
        writer = DirectWriter(fd, ops, len(placeholder), pool)
        try:
            for entry in entries:
                sums[entry.key] = writer.write_entry(entry, host_source(entry))
            writer.finish(lambda: header(sums))
        except BaseException:
            writer.abandon()
            raise
    return sums
