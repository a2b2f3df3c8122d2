"""Checksum many entries of an open file in parallel, before any of their bytes land anywhere.

``load_state_dict`` verifies every tensor before it changes the model (all or nothing), so a
verified load reads the file twice; this module makes the first read cheap. A cached local
file that only this user can write is hashed straight from a read-only mapping
(``mapping.py``, which says why those conditions), with no copy into a buffer, and xxhash
releases the GIL, so the pool's threads hash side by side: ``torchkeep.verify`` of a warm
1.27 GB file took 0.062-0.079 s against 0.165-0.181 s for the serial ``pread``-and-hash it
replaces (docs/performance.md, "Verification pass"). Other files, and objects in a store, are
read into one buffer per task.
"""

from __future__ import annotations

from collections.abc import Callable

from .. import knobs
from ..format import checksum
from . import mapping
from .mapping import Span
from .pool import share_out


def mapped_digests(fd: int, size: int, spans: list[Span], path: str) -> dict[str, str] | None:
    """The xxh3 digest of each span of the local file open as ``fd`` (``size`` bytes at open),
    hashed from a read-only mapping by the pool's threads and the caller; None when the file
    does not qualify (``mapping.worth_mapping``) or cannot be mapped: the caller then reads it."""
    if not spans:
        return {}
    if size == 0:  # only empty entries: nothing to map
        return {key: checksum.digest(b"") for key, _, _ in spans}
    if not mapping.worth_mapping(fd, spans):
        return None
    sums: dict[str, str] = {}
    with mapping.mapped(fd, size, path) as source:
        if source is None:
            return None

        def task(group: list[Span]) -> Callable[[], None]:
            def run() -> None:
                for key, start, nbytes in group:
                    hasher = checksum.new_hasher()
                    for piece in source.pieces(start, nbytes):
                        hasher.update(piece)  # releases the GIL (the one-shot digest may not)
                    sums[key] = hasher.hexdigest()

            return run

        share_out([task(group) for group in mapping.batches(spans, knobs.BATCH_BYTES)])
    return sums


def buffered_digests(
    read_into: Callable[[memoryview, int], None], spans: list[Span], piece: int
) -> dict[str, str]:
    """The digest of each span, read with ``read_into(buffer, offset)`` through one
    ``piece``-byte buffer per task (for files that are not mapped: objects in a store, files
    others can write)."""
    sums: dict[str, str] = {}

    def task(group: list[Span]) -> Callable[[], None]:
        def run() -> None:
            size = max(1, min(piece, max(nbytes for _, _, nbytes in group)))
            scratch = memoryview(bytearray(size))
            for key, start, nbytes in group:
                hasher = checksum.new_hasher()
                for lo in range(0, nbytes, size):
                    part = scratch[: min(size, nbytes - lo)]
                    read_into(part, start + lo)
                    hasher.update(part)
                sums[key] = hasher.hexdigest()

        return run

    share_out([task(group) for group in mapping.batches(spans, knobs.BATCH_BYTES)])
    return sums
