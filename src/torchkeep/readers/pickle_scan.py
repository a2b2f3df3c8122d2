"""Static analysis of pickles: which globals a pickle-based file imports, found without running it.

The public face of the scanner. :mod:`.pickle_vm` replays each pickle on a model of the
unpickler (stack, marks, memo; every opcode of protocols 0-5); :mod:`.containers` finds every
pickle a loader would unpickle (torch zips and archives nested in them, the legacy stream and
tar formats, plain pickles) with bounded reads. A file is safe for weights-only loading when
every global it imports is allowed and nothing was left unresolved.
"""

from __future__ import annotations

import io

from ..errors import CheckpointNotFoundError, FormatError
from .containers import ScanResult, scan_path, scan_payload, scan_pickles

__all__ = ["ScanResult", "scan_bytes", "scan_file", "scan_stream"]


def scan_stream(data: bytes, result: ScanResult, name: str) -> None:
    """Scan the consecutive pickles of ``data`` (a plain or legacy stream) into ``result``."""
    scan_pickles(io.BytesIO(data), result, name)


def scan_bytes(data: bytes, name: str = "bytes", result: ScanResult | None = None) -> ScanResult:
    """Whatever ``torch.load`` would unpickle from ``data`` (zip, tar or pickle stream)."""
    result = result or ScanResult()
    scan_payload(io.BytesIO(data), result, name)
    return result


def scan_file(path: str) -> ScanResult:
    """Every pickle a loader would unpickle from the file at ``path`` (zip, tar, legacy, plain)."""
    try:
        return scan_path(path)
    except FileNotFoundError:
        raise CheckpointNotFoundError(f"{path}: no such file") from None
    except (IsADirectoryError, PermissionError) as exc:
        raise FormatError(f"{path}: cannot be read as a checkpoint file ({exc})") from exc
