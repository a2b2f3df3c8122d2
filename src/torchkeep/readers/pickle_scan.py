"""Static analysis of pickles: which globals a pickle would import, found without running it.

Walks the opcode stream with :mod:`pickletools` (which only parses) and records every
``GLOBAL``/``STACK_GLOBAL``/``INST`` reference. Handles torch zip archives (any folder name) and
the legacy torch format (several pickles in a row).
"""

from __future__ import annotations

import io
import pickletools
import zipfile
from dataclasses import dataclass, field

from ..errors import FormatError

_STRING_OPS = {
    "SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE",
    "SHORT_BINSTRING", "BINSTRING", "STRING",
}  # fmt: skip
_GET_OPS = {"GET", "BINGET", "LONG_BINGET"}
_PUT_OPS = {"PUT", "BINPUT", "LONG_BINPUT"}
_MAX_PICKLES = 8  # the legacy torch format holds 5 pickles before raw storage bytes


@dataclass
class ScanResult:
    """Globals referenced by a pickle-based file, in first-seen order."""

    globals: list[str] = field(default_factory=list)
    pickles: list[str] = field(default_factory=list)  # names of the scanned pickle streams

    def add(self, ref: str) -> None:
        if ref not in self.globals:
            self.globals.append(ref)

    def unsafe(self, allowed: set[str]) -> list[str]:
        return [g for g in self.globals if g not in allowed]


def scan_stream(data: bytes, result: ScanResult, name: str) -> None:
    """Scan consecutive pickles in ``data`` until it ends or stops being a pickle."""
    stream = io.BytesIO(data)
    for _ in range(_MAX_PICKLES):
        start = stream.tell()
        if start >= len(data):
            return
        if not _scan_one(stream, result):
            return
        result.pickles.append(f"{name}@{start}")


def _scan_one(stream: io.BytesIO, result: ScanResult) -> bool:
    strings: list[str] = []
    memo: dict[int, str] = {}
    last: str | None = None
    try:
        for opcode, arg, _pos in pickletools.genops(stream):
            op = opcode.name
            if op in _STRING_OPS:
                last = arg if isinstance(arg, str) else None
                if last is not None:
                    strings.append(last)
            elif op == "MEMOIZE" and last is not None:
                memo[len(memo)] = last
            elif op in _PUT_OPS and last is not None:
                memo[arg] = last
            elif op in _GET_OPS and arg in memo:
                last = memo[arg]
                strings.append(last)
            elif op in ("GLOBAL", "INST"):
                module, _, name = str(arg).partition(" ")
                result.add(f"{module}.{name}")
            elif op == "STACK_GLOBAL":
                result.add(".".join(strings[-2:]) if len(strings) >= 2 else "<unknown>.<unknown>")
            else:
                last = None if op not in ("MEMOIZE",) else last
    except Exception:  # noqa: BLE001 - a truncated or garbled pickle ends the scan, not us
        return False
    return True


def torch_zip_pickles(path: str) -> list[tuple[str, bytes]]:
    """The ``*.pkl`` members of a torch zip archive (``data.pkl``, ``*/constants.pkl`` ...)."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = [n for n in archive.namelist() if n.endswith(".pkl")]
            return [(n, archive.read(n)) for n in names]
    except (zipfile.BadZipFile, OSError, ValueError, RuntimeError, EOFError) as exc:
        raise FormatError(f"{path}: not a readable zip archive ({exc})") from exc


def scan_file(path: str) -> ScanResult:
    """Globals referenced by a torch.save file (zip or legacy) or a plain pickle file."""
    result = ScanResult()
    try:
        is_zip = zipfile.is_zipfile(path)
    except (zipfile.BadZipFile, ValueError, EOFError) as exc:  # garbled end-of-archive record
        raise FormatError(f"{path}: not a readable zip archive ({exc})") from exc
    if is_zip:
        for name, data in torch_zip_pickles(path):
            scan_stream(data, result, name)
        return result
    with open(path, "rb") as handle:
        head = handle.read(64 << 20)  # legacy pickles precede the raw storage bytes
    scan_stream(head, result, "pickle")
    return result
