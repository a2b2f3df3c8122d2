"""Read ``torch.save`` files (zip and legacy format) without running code from them.

Loading goes through torch's ``weights_only`` unpickler. When it refuses, torchkeep scans the
pickle statically and raises :class:`UnsafeFileError` listing the globals the file references and
how to opt in. Only ``trusted=True`` loads with the full unpickler; there is no silent fallback.
"""

from __future__ import annotations

import pickle
import struct
import warnings
import zipfile
from typing import Any

import torch

from ..errors import FormatError, TorchkeepError, UnsafeFileError
from .pickle_scan import ScanResult, scan_file


def allowed_globals() -> set[str]:
    """``module.name`` of every global torch's weights-only unpickler accepts right now."""
    from torch import _weights_only_unpickler as wou

    allowed = set()
    for ref in list(wou._get_allowed_globals()) + [
        f"{g.__module__}.{g.__qualname__}" if not isinstance(g, tuple) else None
        for g in torch.serialization.get_safe_globals()
    ]:
        if isinstance(ref, str):
            allowed.add(ref)
    return allowed


def unsafe_globals(scan: ScanResult) -> list[str]:
    """Globals outside the weights-only allow-list, then what the scan could not resolve."""
    return scan.unsafe(allowed_globals())


def _listing(items: list[str]) -> str:
    return "; ".join(items[:8]) + (f" and {len(items) - 8} more" if len(items) > 8 else "")


def refusal(path: str, scan: ScanResult, detail: str = "") -> UnsafeFileError:
    """The unsafe-file error: the globals refused (or what was unresolved) and how to opt in."""
    refused = scan.refused(allowed_globals())
    if refused:
        what = f"the file needs globals outside the weights-only allow-list ({_listing(refused)})"
    elif scan.problems:
        what = f"the scan cannot prove the file harmless ({_listing(scan.problems)})"
    else:
        what = "torch's weights-only unpickler refused it"
    return UnsafeFileError(
        f"{path}: refused to unpickle: {what}{detail}. Nothing was executed. Load it with "
        "trusted=True (CLI: --trusted) only if you trust its source, or convert it once with "
        "'torchkeep convert SRC DST.tk --trusted'",
        globals=refused,
    )


def load_torch_file(
    path: str, map_location: Any = None, mmap: bool = False, trusted: bool = False
) -> Any:
    """``torch.load`` with ``weights_only=True`` unless the caller trusts the file."""
    if not trusted:
        # Nothing reaches torch's unpickler (or its whole-record reads: a deflated 1 GiB
        # data.pkl) unless the scan proved it harmless; refused globals are named.
        scan = scan_file(path)
        if scan.unreadable and not scan.refused(allowed_globals()):
            raise FormatError(f"{path}: not a readable torch.save file ({scan.unreadable[0]})")
        if unsafe_globals(scan):
            raise refusal(path, scan)
    kwargs: dict[str, Any] = {"map_location": map_location, "weights_only": not trusted}
    if mmap:
        kwargs["mmap"] = True
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(path, **kwargs)
    except pickle.UnpicklingError as exc:
        if trusted:
            raise FormatError(f"{path}: not a readable torch.save file ({exc})") from exc
        raise refusal(path, scan_file(path), f" (torch: {str(exc).splitlines()[0]})") from exc
    except (RuntimeError, EOFError, ValueError, OSError, KeyError, AttributeError, IndexError,
            TypeError, AssertionError, struct.error, zipfile.BadZipFile) as exc:  # fmt: skip
        # torch.load reports garbled files with many exception types; all mean "malformed".
        if mmap and "mmap" in str(exc):
            return load_torch_file(path, map_location, False, trusted)
        if "on a CUDA device" in str(exc) and not torch.cuda.is_available():
            raise TorchkeepError(
                f"{path}: its tensors were saved on a CUDA device and CUDA is not available "
                "here; pass map_location='cpu' (load_state_dict places them by itself)"
            ) from exc
        raise FormatError(f"{path}: not a readable torch.save file ({exc})") from exc
