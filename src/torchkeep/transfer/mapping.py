"""Read a cached local file through a read-only mapping of its open descriptor, piece by piece.

A load that reads a whole file right before it needs the bytes (the verification pass in
``hashing.py``, then the copy of verified entries into a model) can take them from a mapping
instead of ``pread``: no copy through a buffer, and the pool's threads work side by side. Three
rules keep that safe and cheap:

* **Only files nobody else can write** (:func:`safe_to_map`): a mapped file that another process
  truncates kills the reader with ``SIGBUS`` (as with ``torch.load(mmap=True)`` or
  ``safetensors``) instead of raising an error. Any other file, e.g. one in a directory someone
  else prepared, is read with ``pread``. The size is checked again just before mapping.
* **Only cached files** (:func:`looks_cached`): a file read from disk through a mapping is faulted
  in a few pages at a time and the page cache then holds it in small pages, which made every
  later mapped pass 1.5x slower (0.09 s against 0.06 s for the 1.27 GB LLM-like file);
  sequential ``pread`` calls let the kernel read ahead in large pieces.
* **Pages are dropped once used** (:meth:`Mapped.pieces`): each piece of
  ``VERIFY_MAP_PIECE_BYTES`` leaves the process's page tables (not the page cache) after use,
  so RSS grows by a few pieces, not by the file.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import stat
from collections.abc import Callable, Iterator

import numpy as np

from .. import knobs
from ..errors import FormatError
from .memcopy import copy_bytes
from .pool import share_out

#: One range to read: a key, the absolute offset of its bytes in the file, their length.
Span = tuple[str, int, int]


def safe_to_map(fd: int) -> bool:
    """True when no other user can truncate the open file ``fd`` under a mapping: this user
    owns it and it has no group or other write permission (an ACL granting write shows there)."""
    info = os.fstat(fd)
    return info.st_uid == os.geteuid() and not info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)


def looks_cached(fd: int, spans: list[Span], samples: int = 16) -> bool:
    """Whether the spans' bytes seem to be in the page cache: one-byte reads spread over them
    with ``RWF_NOWAIT`` (which fails instead of waiting for the disk) all succeed."""
    flag = getattr(os, "RWF_NOWAIT", None)
    if flag is None or not spans:
        return False
    lo = min(start for _, start, _ in spans)
    hi = max(start + nbytes for _, start, nbytes in spans)
    probe = bytearray(1)
    for i in range(samples):
        try:
            if os.preadv(fd, [probe], lo + (hi - lo) * i // samples, flag) != 1:
                return False
        except OSError:  # EAGAIN: not cached (or the flag is not supported here)
            return False
    return True


def worth_mapping(fd: int, spans: list[Span]) -> bool:
    """Both rules of this module: nobody else can write the file, and it is cached."""
    return safe_to_map(fd) and looks_cached(fd, spans)


def batches(spans: list[Span], batch: int) -> list[list[Span]]:
    """Neighbouring spans grouped into tasks of about ``batch`` bytes, largest first: a small
    file is one task, done by the caller alone (no thread is started for it)."""
    groups: list[list[Span]] = []
    size = batch
    for span in sorted(spans, key=lambda span: span[1]):
        if size >= batch:
            groups.append([])
            size = 0
        groups[-1].append(span)
        size += span[2]
    return sorted(groups, key=lambda group: -sum(n for _, _, n in group))


class Mapped:
    """An open read-only mapping of a whole file."""

    def __init__(self, mapping: mmap.mmap, view: memoryview) -> None:
        self.mapping = mapping
        self.view = view

    def pieces(self, start: int, nbytes: int) -> Iterator[memoryview]:
        """Bytes ``[start, start + nbytes)`` in pieces; each piece's pages are dropped from
        this process (they stay in the page cache) once the caller asks for the next."""
        step = max(mmap.PAGESIZE, knobs.VERIFY_MAP_PIECE_BYTES)
        for lo in range(start, start + nbytes, step):
            hi = min(start + nbytes, lo + step)
            with self.view[lo:hi] as piece:
                yield piece
            aligned = lo - lo % mmap.PAGESIZE
            self.mapping.madvise(mmap.MADV_DONTNEED, aligned, hi - aligned)


@contextlib.contextmanager
def mapped(fd: int, size: int, path: str) -> Iterator[Mapped | None]:
    """Map the ``size`` bytes of the open file ``fd``; yields None when it cannot be mapped
    (an empty file, no address space left under ``RLIMIT_AS``, a file system without mmap):
    the caller then reads it."""
    if os.fstat(fd).st_size < size:
        raise FormatError(f"{path}: the file shrank while it was open; it is being rewritten")
    try:
        mapping = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
    except (OSError, ValueError):
        yield None
        return
    view = memoryview(mapping)
    try:
        yield Mapped(mapping, view)
    finally:
        # A piece still held by an exception's traceback keeps the mapping exported; it is
        # then unmapped with the last reference instead, and the exception is the caller's.
        with contextlib.suppress(BufferError):
            view.release()
            mapping.close()


def copy_into(fd: int, size: int, placed: list[tuple[int, memoryview]], path: str) -> bool:
    """Copy the file's bytes at each ``(offset, destination)`` into the destination, in
    parallel from a mapping; False (nothing copied) when the file does not qualify
    (:func:`worth_mapping`) or cannot be mapped: the caller then reads it."""
    targets = {str(i): view for i, (_, view) in enumerate(placed)}
    spans = [(str(i), offset, view.nbytes) for i, (offset, view) in enumerate(placed)]
    if not spans or not worth_mapping(fd, spans):
        return False
    with mapped(fd, size, path) as source:
        if source is None:
            return False

        def task(group: list[Span]) -> Callable[[], None]:
            def run() -> None:
                for key, start, nbytes in group:
                    dst = np.frombuffer(targets[key], dtype=np.uint8)
                    done = 0
                    for piece in source.pieces(start, nbytes):
                        _copy_piece(dst[done : done + piece.nbytes], piece)
                        done += piece.nbytes

            return run

        share_out([task(group) for group in batches(spans, knobs.BATCH_BYTES)])
    return True


def _copy_piece(dst: np.ndarray, piece: memoryview) -> None:
    """One piece into place; the array over ``piece`` is gone when this returns, so the piece
    can be released."""
    copy_bytes(dst, np.frombuffer(piece, dtype=np.uint8))
