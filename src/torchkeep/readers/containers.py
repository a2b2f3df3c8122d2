"""Every pickle inside a checkpoint container, found and scanned with bounded reads.

A checkpoint reaches an unpickler through several containers: a torch zip (``<top>/data.pkl``
and other ``*.pkl`` members, archives nested in archives), the legacy stream format (five
pickles in a row, then raw storages), the legacy tar format and plain pickle files. This module
walks them the way torch's loaders would and hands every pickle stream to the simulated
unpickler (:mod:`.pickle_vm`). Reads are bounded: nested archives stored uncompressed are read
in place and
compressed ones are spooled (counted against ``SCAN_MAX_TOTAL_BYTES``); each pickle is read
into memory up to ``SCAN_MAX_PICKLE_BYTES`` and parsed from there; member counts and
nesting depth are capped (:mod:`torchkeep.knobs`).
"""

from __future__ import annotations

import io
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import IO

from .. import knobs
from .pickle_vm import Outcome, ScanLimitError, simulate

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # torch's legacy format starts with this pickled int
_ZIP_HEADS = (b"PK\x03\x04", b"PK\x05\x06")
_RAW_NAMES = {"byteorder", "version", ".format_version", ".storage_alignment"}
_SPOOL_IN_MEMORY = 16 * 1024 * 1024


@dataclass
class ScanResult:
    """Globals the scanned pickles import (first-seen order) and what could not be resolved."""

    globals: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    pickles: list[str] = field(default_factory=list)  # names of the scanned pickle streams
    unreadable: list[str] = field(default_factory=list)  # containers that are not archives
    budget: int = field(default_factory=lambda: knobs.SCAN_MAX_TOTAL_BYTES)

    def add(self, ref: str) -> None:
        if ref not in self.globals:
            self.globals.append(ref)

    def record(self, name: str, outcome: Outcome, strict: bool = True) -> None:
        """Merge one pickle's outcome; a lenient scan keeps its globals but not its problems."""
        self.pickles.append(name)
        for ref in outcome.globals:
            self.add(ref)
        if strict:
            self.problems.extend(f"{name}: {p}" for p in outcome.problems)

    def refused(self, allowed: set[str] | Callable[[str], bool]) -> list[str]:
        """The globals outside ``allowed`` (a set of ``module.name`` or a predicate)."""
        ok = allowed if callable(allowed) else allowed.__contains__
        return [g for g in self.globals if not ok(g)]

    def unsafe(self, allowed: set[str] | Callable[[str], bool]) -> list[str]:
        """Everything that makes the file unsafe: refused globals, then unresolved problems."""
        return self.refused(allowed) + [f"unresolved: {p}" for p in self.problems]


def _bounded(stream: IO[bytes], result: ScanResult) -> tuple[io.BytesIO, bool]:
    """At most the per-pickle cap of ``stream`` in memory; whether the stream went on past it.

    The scan then parses from memory at C speed; a member claiming more is never inflated
    beyond the cap, whatever its declared size.
    """
    limit = max(min(knobs.SCAN_MAX_PICKLE_BYTES, result.budget), 0)
    data = stream.read(limit)
    result.budget -= len(data)
    return io.BytesIO(data), len(data) == limit and bool(stream.read(1))


def _over_cap(outcome: Outcome) -> None:
    outcome.problems[:] = [
        f"pickle is larger than the scan cap of {knobs.SCAN_MAX_PICKLE_BYTES} bytes (raise "
        "TORCHKEEP_SCAN_MAX_PICKLE_BYTES for a file you expect to be this large)"
    ]


def _scan_at(buffer: io.BytesIO, more: bool, result: ScanResult, name: str, strict: bool):
    start = buffer.tell()
    outcome = simulate(buffer)
    if more and not outcome.complete and buffer.tell() >= len(buffer.getbuffer()) - 64:
        _over_cap(outcome)  # cut off by the cap, not malformed
    result.record(f"{name}@{start}", outcome, strict)
    return outcome


def scan_pickle(stream: IO[bytes], result: ScanResult, name: str, strict: bool = True) -> Outcome:
    """Scan the one pickle at the start of ``stream`` into ``result`` (bounded read)."""
    buffer, more = _bounded(stream, result)
    return _scan_at(buffer, more, result, name, strict)


def scan_pickles(stream: IO[bytes], result: ScanResult, name: str) -> None:
    """A plain or legacy-format stream: the first pickle strictly, then what torch reads next.

    torch's legacy format is the magic number, protocol version, system info, the object and
    the storage keys (five pickles, strict). After any other first pickle, further pickles are
    scanned leniently (their globals reported) until the bytes stop being a pickle.
    """
    buffer, more = _bounded(stream, result)
    first = _scan_at(buffer, more, result, name, True)
    if not first.complete:
        return
    legacy = type(first.value) is int and first.value == LEGACY_MAGIC
    for _ in range(4 if legacy else 7):
        if buffer.tell() >= len(buffer.getbuffer()):
            if legacy and more:
                _scan_at(buffer, more, result, name, True)  # reports the cap
            return
        if not _scan_at(buffer, more, result, name, legacy).complete:
            return


def is_tar(stream: IO[bytes]) -> bool:
    """Whether ``tarfile`` (as torch's legacy loader calls it) accepts the stream's start."""
    pos = stream.tell()
    try:
        with tarfile.open(fileobj=stream, mode="r:"):
            return True
    except (tarfile.TarError, OSError, ValueError, EOFError):
        return False
    finally:
        stream.seek(pos)


def scan_payload(stream: IO[bytes], result: ScanResult, name: str, depth: int = 0) -> None:
    """Whatever ``torch.load`` would unpickle from ``stream``: zip, tar or legacy/plain pickles."""
    head = stream.read(4)
    stream.seek(-len(head), io.SEEK_CUR)
    if head in _ZIP_HEADS:
        scan_zip_stream(stream, result, name, depth)
    elif is_tar(stream):
        scan_tar(stream, result, name, depth)
    else:
        scan_pickles(stream, result, name)


class Window(io.RawIOBase):
    """A read-only window ``[start, start + length)`` of a seekable stream (no copy)."""

    def __init__(self, raw: IO[bytes], start: int, length: int) -> None:
        super().__init__()
        self.raw, self.start, self.length, self.pos = raw, start, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.length}[whence]
        self.pos = min(max(base + offset, 0), self.length)
        return self.pos

    def tell(self) -> int:
        return self.pos

    def readinto(self, buffer) -> int:  # type: ignore[override]
        n = min(len(buffer), self.length - self.pos)
        if n <= 0:
            return 0
        self.raw.seek(self.start + self.pos)
        data = self.raw.read(n)
        buffer[: len(data)] = data
        self.pos += len(data)
        return len(data)


def _member_stream(archive: zipfile.ZipFile, info: zipfile.ZipInfo, result: ScanResult):
    """A seekable stream of a member holding an archive: in place when stored, else spooled."""
    if info.compress_type == zipfile.ZIP_STORED and archive.fp is not None:
        archive.fp.seek(info.header_offset)
        local = archive.fp.read(30)
        if len(local) == 30 and local[:4] == b"PK\x03\x04":
            start = info.header_offset + 30 + int.from_bytes(local[26:28], "little")
            start += int.from_bytes(local[28:30], "little")
            return Window(archive.fp, start, info.file_size)
    if info.file_size > min(result.budget, knobs.SCAN_MAX_PICKLE_BYTES):
        raise ScanLimitError(
            f"compressed nested archive of {info.file_size} bytes is over the scan cap (raise "
            "TORCHKEEP_SCAN_MAX_PICKLE_BYTES for a file you expect to be this large)"
        )
    spool = tempfile.SpooledTemporaryFile(max_size=_SPOOL_IN_MEMORY)  # noqa: SIM115 - returned
    with archive.open(info) as member:
        while chunk := member.read(1 << 20):
            spool.write(chunk)
            result.budget -= len(chunk)
    spool.seek(0)
    return spool


def _raw_by_name(name: str) -> bool:
    """Members torch.load reads as raw bytes, never unpickles (storages, version records)."""
    parts = name.split("/")
    return (
        (len(parts) > 2 and parts[1] == "data")
        or ".data" in parts[:-1]
        or (len(parts) == 2 and parts[1] in _RAW_NAMES)
    )


def _check_members(infos: list, name: str, depth: int) -> None:
    if len(infos) > knobs.SCAN_MAX_MEMBERS:
        raise ScanLimitError(
            f"{name}: {len(infos)} archive members, over the scan cap of "
            f"{knobs.SCAN_MAX_MEMBERS} (TORCHKEEP_SCAN_MAX_MEMBERS)"
        )
    if depth > knobs.SCAN_MAX_DEPTH:
        raise ScanLimitError(
            f"{name}: archives nested deeper than {knobs.SCAN_MAX_DEPTH} levels "
            "(TORCHKEEP_SCAN_MAX_DEPTH)"
        )


def scan_zip_member(
    archive: zipfile.ZipFile, info: zipfile.ZipInfo, result: ScanResult, where: str, depth: int
) -> None:
    """One member of a generic/torch zip: ``*.pkl`` and pickle-headed members, nested archives."""
    if info.is_dir() or (_raw_by_name(info.filename) and not info.filename.endswith(".pkl")):
        return
    with archive.open(info) as member:
        head = member.read(4)
        if head in _ZIP_HEADS:
            nested = True
        elif info.filename.endswith(".pkl") or (head[:1] == b"\x80" and head[1:2] < b"\x06"):
            member.seek(0)
            scan_pickle(member, result, where)
            return
        else:
            nested = False
    if nested:
        with _member_stream(archive, info, result) as stream:
            scan_zip_stream(stream, result, where, depth + 1)


def scan_zip_stream(
    stream: IO[bytes],
    result: ScanResult,
    name: str,
    depth: int = 0,
    member: Callable[..., None] = scan_zip_member,
) -> None:
    """Every member of a zip (``member`` decides what each one needs), nesting included."""
    try:
        with zipfile.ZipFile(stream) as archive:
            infos = archive.infolist()
            _check_members(infos, name, depth)
            for info in infos:
                member(archive, info, result, f"{name}/{info.filename}", depth)
    except ScanLimitError as exc:
        result.problems.append(f"{name}: {exc}")
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError,
            NotImplementedError, RuntimeError) as exc:  # fmt: skip
        message = f"{name}: unreadable zip archive ({type(exc).__name__}: {exc})"
        result.problems.append(message)
        result.unreadable.append(message)


def scan_tar(stream: IO[bytes], result: ScanResult, name: str, depth: int = 0) -> None:
    """The legacy tar format: each member's leading pickle is scanned, and the file is unsafe.

    torch's weights-only loader refuses this format outright, and its ``storages`` and
    ``tensors`` members interleave pickles with raw bytes sized by earlier pickles, so only a
    trusted load can read it; the scan reports what the members import and says so.
    """
    result.problems.append(
        f"{name}: legacy tar checkpoint; torch loads it only with the full unpickler "
        "(trusted=True), never weights-only"
    )
    try:
        with tarfile.open(fileobj=stream, mode="r:") as tar:
            members = _tar_members(tar, name, depth)
            for info in members:
                handle = tar.extractfile(info)
                if handle is not None:
                    strict = info.name == "pickle"  # the others interleave raw bytes
                    scan_pickle(handle, result, f"{name}/{info.name}", strict=strict)
    except ScanLimitError as exc:
        result.problems.append(f"{name}: {exc}")
    except (tarfile.TarError, OSError, ValueError, EOFError) as exc:
        result.problems.append(f"{name}: unreadable tar archive ({exc})")
        result.unreadable.append(result.problems[-1])


def _tar_members(tar: tarfile.TarFile, name: str, depth: int) -> Iterable[tarfile.TarInfo]:
    members = []
    for info in tar:
        members.append(info)
        _check_members(members, name, depth)
    return [m for m in members if m.isfile()]


def scan_path(path: str, result: ScanResult | None = None) -> ScanResult:
    """Every pickle a loader would unpickle from the file at ``path``."""
    result = result or ScanResult()
    with open(path, "rb") as handle:
        scan_payload(handle, result, path.rsplit("/", 1)[-1])
    return result
