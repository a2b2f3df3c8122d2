"""Write a torchkeep file: header with fixed-width checksum placeholders, data, final header.

The checksums live in the header, but the header must precede the data. Checksums are fixed
width, so the header's length is known before any data is hashed: the data is written (and
hashed in the same pass, chunk by chunk, while a thread pool writes the previous chunks), then
the final header, identical in length, is written over the placeholder.
"""

from __future__ import annotations

import ctypes
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from .. import knobs
from ..errors import UnsupportedValueError
from ..format import checksum, header
from ..format.layout import Entry, plan_entries
from ..format.memory import byte_view, host_source, small_buffer
from ..format.tree import encode
from ..storage.io import IOV_MAX, FileOps, write_all, writev_all
from .direct_writer import DirectWriter, usable_image, wants_direct
from .gcpause import paused_gc
from .pool import Pipeline


@dataclass
class PreparedFile:
    """Everything needed to write one file; building it validates the object (no I/O yet)."""

    entries: list[Entry]
    tree: Any
    user_metadata: dict[str, str]
    #: Set by an async snapshot: a uint8 tensor laid out as the file (header region blank)
    #: whose page-aligned segments direct I/O writes from without another copy.
    image: Any = None

    @property
    def data_bytes(self) -> int:
        return self.entries[-1].end if self.entries else 0

    @cached_property
    def _entries_json(self) -> dict[str, dict]:
        return {
            e.key: {"dtype": e.st_dtype, "shape": e.shape, "data_offsets": [e.begin, e.end]}
            for e in self.entries
        }

    @cached_property
    def _tree_text(self) -> str:
        return json.dumps(self.tree, separators=(",", ":"), allow_nan=False)

    @cached_property
    def _placeholder_meta(self) -> dict[str, str]:
        return self._metadata(None)

    @cached_property
    def _placeholder(self) -> bytes:
        return header.encode_header(self._entries_json, self._placeholder_meta)

    def header_bytes(self, sums: dict[str, str] | None = None) -> bytes:
        """Serialized header; placeholders for the checksums when ``sums`` is None. Both have
        the same length: the final header is written over the placeholder's bytes."""
        if sums is None:
            return self._placeholder
        final = self._final(sums)
        if len(final) != len(self._placeholder):  # fixed-width fields make this impossible
            raise AssertionError("torchkeep header changed length between placeholder and final")
        return final

    def _metadata(self, sums: dict[str, str] | None) -> dict[str, str]:
        if sums is None:
            sums = dict.fromkeys(self._entries_json, checksum.PLACEHOLDER)
        return header.torchkeep_metadata(self._tree_text, sums, self.user_metadata)

    def _final(self, sums: dict[str, str]) -> bytes:
        """The placeholder header with the checksums filled in, then sealed.

        The checksum table is fixed width, so it is patched into the placeholder's bytes instead
        of serializing a multi-megabyte header again (20,000 tensors: ~60 ms saved).
        """
        name = header.META_CHECKSUMS
        old = _field(name, self._placeholder_meta[name])
        new = _field(name, self._metadata(sums)[name])
        raw = self._placeholder
        at = raw.find(old)
        if at < 0 or len(old) != len(new):  # cannot happen with fixed-width fields
            raise AssertionError(f"torchkeep header field {name} not found for patching")
        return header.seal(b"".join((raw[:at], new, raw[at + len(old) :])))

    @property
    def total_bytes(self) -> int:
        return len(self._placeholder) + self.data_bytes


def _field(name: str, value: str) -> bytes:
    """How ``"name": value`` appears in the header JSON (as ``encode_header`` writes it)."""
    text = json.dumps({name: value}, separators=(",", ":"), ensure_ascii=False)[1:-1]
    return text.encode("utf-8")


def prepare(obj: Any, metadata: dict[str, str] | None = None) -> PreparedFile:
    """Encode ``obj`` and plan its entries; raises before anything touches the disk."""
    with paused_gc():
        return _prepare(obj, metadata)


def _utf8_ok(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _prepare(obj: Any, metadata: dict[str, str] | None) -> PreparedFile:
    user = dict(metadata or {})
    for key, value in user.items():
        if not (isinstance(key, str) and isinstance(value, str)):
            raise UnsupportedValueError(f"metadata[{key!r}]: metadata must map str to str")
        if key.startswith("torchkeep.") or key == header.META_FORMAT:
            raise UnsupportedValueError(f"metadata[{key!r}]: this key is reserved by torchkeep")
        if not (_utf8_ok(key) and _utf8_ok(value)):
            raise UnsupportedValueError(
                f"metadata[{key!r}]: lone surrogates cannot be stored as UTF-8; fix the string"
            )
    tree, leaves = encode(obj)
    prepared = PreparedFile(plan_entries(leaves), tree, user)
    prepared.header_bytes()  # build the placeholder header now, still without the collector
    return prepared


def _load_sync_file_range() -> Any:
    """libc ``sync_file_range`` (Linux), or None where it is unavailable."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_SYNC_FILE_RANGE = _load_sync_file_range() if sys.platform.startswith("linux") else None
_SYNC_FILE_RANGE_WRITE = 2


def write_chunk(ops: FileOps, fd: int, data: memoryview | list[Any], offset: int) -> None:
    """Write ``data`` (one buffer, or several back to back) at ``offset``, then start (not wait
    for) its writeback to disk.

    Starting writeback per chunk lets the disk work while later chunks are still being copied
    into the page cache, so the final fsync has little left to flush. Best effort: errors are
    ignored here because the fsync that commits the file reports them.
    """
    if isinstance(data, list):
        writev_all(ops, fd, data, offset)
        nbytes = sum(v.nbytes for v in data)
    else:
        write_all(ops, fd, data, offset)
        nbytes = data.nbytes
    if _SYNC_FILE_RANGE is not None and knobs.EARLY_WRITEBACK and nbytes >= 1 << 20:
        _SYNC_FILE_RANGE(fd, offset, nbytes, _SYNC_FILE_RANGE_WRITE)


class _DataWriter:
    """Writes tensor bytes at file offsets through a small thread pool, hashing as it goes.

    Large entries are written straight from tensor memory in ``CHUNK_BYTES`` pieces; the main
    thread hashes a chunk while the pool writes it (xxhash and ``pwrite`` release the GIL).
    Entries up to ``SMALL_TENSOR_BYTES`` are gathered into a batch written with one vectored
    call (``pwritev``) straight from tensor memory, so per-tensor cost is one hash and a list
    append, not a copy, a syscall and a thread hand-off.
    """

    def __init__(self, fd: int, ops: FileOps, data_start: int) -> None:
        self.fd, self.ops, self.data_start = fd, ops, data_start
        self.jobs = Pipeline(limit=max(2, 2 * knobs.IO_THREADS))
        self.batch: list[Any] = []  # small tensors' buffers, contiguous in the file
        self.used = 0
        self.batch_at = 0  # data offset of the batch's first byte

    def _submit(self, data: memoryview | list[Any], offset: int) -> None:
        self.jobs.submit(write_chunk, self.ops, self.fd, data, self.data_start + offset)

    def _flush(self) -> None:
        if self.batch:
            self._submit(self.batch, self.batch_at)
            self.batch, self.used = [], 0

    def write_entry(self, entry: Entry) -> str:
        """Schedule ``entry``'s bytes for writing and return their checksum (hashed here
        unless the entry came with it)."""
        source = host_source(entry)
        size = entry.end - entry.begin
        if size <= knobs.SMALL_TENSOR_BYTES:
            buffer = small_buffer(source)
            self._add_small(buffer, entry.begin, size)
            return entry.checksum or checksum.digest(buffer)
        self._flush()
        view = byte_view(source)
        hasher = checksum.new_hasher() if entry.checksum is None else None
        step = max(1, knobs.CHUNK_BYTES)
        for lo in range(0, view.nbytes, step):
            chunk = view[lo : lo + step]
            self._submit(chunk, entry.begin + lo)
            if hasher is not None:
                hasher.update(chunk)  # overlaps with the pool writing this same chunk
        return hasher.hexdigest() if hasher is not None else str(entry.checksum)

    def _add_small(self, buffer: Any, begin: int, size: int) -> None:
        if size:
            if self.used + size > knobs.BATCH_BYTES or len(self.batch) >= IOV_MAX:
                self._flush()
            if not self.batch:
                self.batch_at = begin
            self.batch.append(buffer)
            self.used += size

    def finish(self) -> None:
        """Write the last batch and wait for every write; re-raises a worker's error."""
        self._flush()
        self.jobs.wait()

    def abandon(self) -> None:
        """After an error: nothing of this file may still be running when the caller
        closes the descriptor."""
        self.jobs.abandon()


def write_prepared(prepared: PreparedFile, fd: int, ops: FileOps) -> dict[str, str]:
    """Write header placeholder, data and final header to ``fd``; returns the checksums."""
    with paused_gc():
        return _write_prepared(prepared, fd, ops)


def _write_prepared(prepared: PreparedFile, fd: int, ops: FileOps) -> dict[str, str]:
    if wants_direct(prepared.entries) and ops.set_direct(fd, True):
        try:
            return _write_direct(prepared, fd, ops)
        finally:
            ops.set_direct(fd, False)
    return _write_buffered(prepared, fd, ops)


def _write_entries(writer: _DataWriter | DirectWriter, entries: list[Entry]) -> dict[str, str]:
    """Hand every entry to ``writer`` and wait for its writes; returns the checksums. After an
    error nothing of the file is still being written when this raises."""
    sums: dict[str, str] = {}
    try:
        for entry in entries:
            sums[entry.key] = writer.write_entry(entry)
        writer.finish()
    except BaseException:
        writer.abandon()
        raise
    return sums


def _write_buffered(prepared: PreparedFile, fd: int, ops: FileOps) -> dict[str, str]:
    placeholder = prepared.header_bytes()
    write_all(ops, fd, memoryview(placeholder), 0)
    sums = _write_entries(_DataWriter(fd, ops, len(placeholder)), prepared.entries)
    write_all(ops, fd, memoryview(prepared.header_bytes(sums)), 0)
    return sums


def _write_direct(prepared: PreparedFile, fd: int, ops: FileOps) -> dict[str, str]:
    """The direct-I/O path (``direct_writer.py``); the caller switched ``fd`` to direct I/O."""
    image = usable_image(prepared.image, prepared.total_bytes)
    writer = DirectWriter(fd, ops, len(prepared.header_bytes()), image)
    sums = _write_entries(writer, prepared.entries)
    writer.write_head(prepared.header_bytes(sums))
    return sums


class PreparedPayload:
    """A prepared file as a storage payload: ``fill`` is the local path above (offsets, direct
    I/O); ``chunks`` streams the file in order for object stores.

    A stream cannot go back to patch the header, so ``chunks`` first hashes every entry (one
    pass over tensor memory, far faster than any upload), then yields the final header and the
    entries' bytes straight from tensor memory: no copy of the checkpoint is made.
    """

    def __init__(self, prepared: PreparedFile, sums: dict[str, str] | None = None) -> None:
        """``sums``, when given, receives each entry's checksum once the bytes are written
        (an incremental manager records them)."""
        self.prepared = prepared
        self.size = prepared.total_bytes
        self.sums = sums if sums is not None else {}

    def fill(self, fd: int, file_ops: FileOps) -> None:
        self.sums.clear()
        self.sums.update(write_prepared(self.prepared, fd, file_ops))

    def chunks(self) -> Iterator[memoryview]:
        with paused_gc():
            sums = {
                e.key: e.checksum or checksum.digest(_entry_bytes(e)) for e in self.prepared.entries
            }
            head = self.prepared.header_bytes(sums)
        self.sums.clear()
        self.sums.update(sums)
        yield memoryview(head)
        at = 0
        for entry in self.prepared.entries:
            if entry.begin > at:  # no gaps in today's layout; stay exact if one appears
                yield memoryview(bytes(entry.begin - at))
            view = _entry_bytes(entry)
            if view.nbytes:
                yield view
            at = entry.end


def _entry_bytes(entry: Entry) -> memoryview:
    """An entry's bytes as a flat byte view of host memory."""
    source = host_source(entry)
    if entry.end - entry.begin <= knobs.SMALL_TENSOR_BYTES:
        return memoryview(small_buffer(source)).cast("B")
    return byte_view(source)
