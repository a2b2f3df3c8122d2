"""Write a file's tensor data with direct I/O through reused, aligned staging buffers.

The file's bytes are cut into aligned segments of ``DIRECT_CHUNK_BYTES``. The main thread walks
the entries in file order, hashing each and recording which pieces of tensor memory land in
which segment; a pool thread copies a full segment's pieces into a staging buffer and writes it
with one aligned ``pwrite``. The first segment holds the header, which is final only once every
checksum is known, so it is kept and written last; the last segment is padded to the alignment
and the file cut back to its length. The bytes on disk are exactly those of a buffered save.

An async save's snapshot is already laid out as a page-aligned image of the file (see
``asyncsave.Stager``): then the segments are written straight from it and nothing is copied.

Why: a buffered save copies every byte into a freshly allocated page-cache page. On VMs whose
host reclaims freed guest memory, faulting those pages in costs more than the disk write
(docs/performance.md), and on any machine the save evicts pages the training loop wanted.
"""

from __future__ import annotations

import errno
import threading
from typing import Any

from .. import knobs
from ..format import checksum
from ..format.layout import Entry
from ..format.memory import byte_view, host_source, small_buffer
from ..storage.aligned import STAGING, AlignedBuffer, align_up
from ..storage.io import FileOps, write_all
from .pool import Pipeline

#: A piece of tensor memory: (offset in its segment, source address, byte count).
Piece = tuple[int, int, int]


def wants_direct(entries: list[Entry]) -> bool:
    """Whether these entries are written with direct I/O: when their tensors larger than
    ``SMALL_TENSOR_BYTES`` hold at least ``DIRECT_MIN_BYTES``.

    Small tensors are left out of the count because direct I/O copies every byte into
    staging, one call per tensor, while the buffered path gathers them into ``pwritev`` calls
    straight from their memory (20,000 tensors of 1-4 KB: 0.23 s direct, 0.18-0.20 s buffered).
    """
    if not knobs.DIRECT_IO:
        return False
    threshold, small = max(1, knobs.DIRECT_MIN_BYTES), knobs.SMALL_TENSOR_BYTES
    if not entries or entries[-1].end < threshold:
        return False
    large = 0
    for entry in entries:
        size = entry.end - entry.begin
        if size > small:
            large += size
            if large >= threshold:
                return True
    return False


class DirectWriter:
    """Stages and writes one file's bytes; see the module docstring for the order of work."""

    def __init__(
        self, fd: int, ops: FileOps, data_start: int, image: AlignedBuffer | None = None
    ) -> None:
        self.fd, self.ops = fd, ops
        self.align = direct_alignment()
        # from an image no staging buffer is involved, so its segments can be larger
        size = knobs.DIRECT_IMAGE_CHUNK_BYTES if image is not None else knobs.DIRECT_CHUNK_BYTES
        self.chunk = align_up(max(1, size), self.align)
        self.data_start = data_start
        self.head_size = align_up(data_start, self.align)  # header + first data bytes
        self.image = image  # file offset i lives at image byte i; None: copy into staging
        self.head = image if image is not None else AlignedBuffer(self.head_size)
        self.seg_start = self.head_size  # file offset of the segment being filled
        self.pieces: list[Piece] = []
        self.position = data_start  # file offset of the next byte
        self.jobs = Pipeline(limit=max(2, 2 * knobs.IO_THREADS))
        self.keep_alive: list[Any] = []  # host copies of device tensors, alive until written
        self.direct_lock = threading.Lock()
        self.direct = True

    # -- main thread -------------------------------------------------------------------------
    def write_entry(self, entry: Entry) -> str:
        """Stage ``entry``'s bytes for writing and return their checksum."""
        source = host_source(entry)
        if source is not entry.source:
            self.keep_alive.append(source)
        size = entry.end - entry.begin
        address = source.data_ptr()
        if self.image is not None and size and address != self.image.address + self.position:
            raise AssertionError(f"{entry.key}: staged bytes are not where the file image has them")
        if entry.checksum is not None:  # hashed by the snapshot that copied it
            self._add(address, size)
            return entry.checksum
        if size <= knobs.SMALL_TENSOR_BYTES:  # one call each: per-tensor cost matters here
            self._add(address, size)
            return checksum.digest(small_buffer(source))
        view = byte_view(source)
        hasher = checksum.new_hasher()
        # Hash in segment-sized steps: each step's segments are queued before it is hashed, so
        # the pool never idles while a long hash runs (the queue holds only a few segments).
        step = max(1, min(knobs.CHUNK_BYTES, self.chunk))
        for lo in range(0, size, step):
            n = min(step, size - lo)
            self._add(address + lo, n)
            hasher.update(view[lo : lo + n])  # overlaps with the pool copying and writing
        return hasher.hexdigest()

    def _add(self, address: int, nbytes: int) -> None:
        """Account for the next ``nbytes`` of the file (at ``address`` in memory), submitting
        each segment as it fills; without an image, record where to copy them from."""
        if self.position < self.head_size:
            n = min(nbytes, self.head_size - self.position)
            if self.image is None:
                self.head.copy_in(self.position, address, n)
            self.position += n
            address, nbytes = address + n, nbytes - n
        while nbytes:
            room = self.seg_start + self.chunk - self.position
            n = min(nbytes, room)
            if self.image is None:
                self.pieces.append((self.position - self.seg_start, address, n))
            self.position += n
            address, nbytes = address + n, nbytes - n
            if n == room:
                self._submit_segment()

    def _submit_segment(self) -> None:
        length = self.position - self.seg_start  # negative when the data ended inside the head
        if length > 0:
            self.jobs.submit(self._write_segment, self.seg_start, self.pieces, length)
        self.seg_start, self.pieces = self.position, []

    def finish(self) -> None:
        """Write the last segment and wait for every write; re-raises a worker's error."""
        if self.image is not None:  # a reused image holds stale bytes past the end
            end = align_up(self.position, self.align)
            self.image.zero(self.position, end - self.position)
        self._submit_segment()
        self.jobs.wait()

    def write_head(self, final_header: bytes) -> None:
        """Last: the block holding the final header, then cut the padding off the end."""
        self.head.view[: len(final_header)] = final_header
        self._write(self.head.view[: self.head_size], 0)
        self.ops.truncate(self.fd, self.position)

    def abandon(self) -> None:
        """After an error: nothing of this file may still be running when the caller
        closes the descriptor."""
        self.jobs.abandon()

    # -- pool threads ------------------------------------------------------------------------
    def _write_segment(self, offset: int, pieces: list[Piece], length: int) -> None:
        padded = align_up(length, self.align)
        if self.image is not None:
            self._write(self.image.view[offset : offset + padded], offset)
            return
        buffer = STAGING.take(self.chunk)
        try:
            for at, address, n in pieces:
                buffer.copy_in(at, address, n)
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


def direct_alignment() -> int:
    """Alignment of direct-I/O buffers, offsets and lengths (at least 512 bytes)."""
    return max(512, knobs.DIRECT_ALIGN)


def usable_image(image: Any, file_bytes: int) -> AlignedBuffer | None:
    """The async snapshot ``image`` (a uint8 tensor laid out as the file) to write from, or None
    when it cannot be used as it is: a knob changed between the snapshot and the write left it
    misaligned or short, and the writer copies into staging instead."""
    align = direct_alignment()
    if image is None or image.data_ptr() % align or image.numel() < align_up(file_bytes, align):
        return None
    return AlignedBuffer.borrow(byte_view(image), image.data_ptr(), align)
