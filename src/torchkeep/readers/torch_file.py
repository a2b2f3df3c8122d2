"""Read ``torch.save`` files (zip and legacy format) without running code from them.

Loading goes through torch's ``weights_only`` unpickler. When it refuses, torchkeep scans the
pickle statically and raises :class:`UnsafeFileError` listing the globals the file references and
how to opt in. Only ``trusted=True`` loads with the full unpickler; there is no silent fallback.
"""

from __future__ import annotations

import os
import pickle
import struct
import warnings
import zipfile
from typing import Any

import torch

from ..errors import FormatError, TorchkeepError, UnsafeFileError
from ..format import bounds
from . import safe_globals
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
    return allowed | safe_globals.ALLOWED_NAMES


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


def _refused_by_unpickler(path: str, exc: pickle.UnpicklingError) -> UnsafeFileError:
    """The refusal when torch's unpickler (or a NumPy stand-in) stopped, not the scan."""
    scan = scan_file(path)
    reason = _unpickler_reason(str(exc))
    if unsafe_globals(scan):
        return refusal(path, scan, f" (torch: {reason})")
    return UnsafeFileError(  # every global is allowed, but a value was outside what it accepts
        f"{path}: refused to unpickle (torch: {reason}). Nothing was executed. Load it with "
        "trusted=True "
        "(CLI: --trusted) only if you trust its source",
        globals=[],
    )


def _unpickler_reason(text: str) -> str:
    """The line that says why, from torch's long weights-only message."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for i, line in enumerate(lines):
        if line.endswith("WeightsUnpickler error:") and i + 1 < len(lines):
            return lines[i + 1]
        if "WeightsUnpickler error:" in line:
            return line.split("WeightsUnpickler error:", 1)[1].strip()
    return lines[0] if lines else "unknown reason"


def load_torch_file(
    path: str, map_location: Any = None, mmap: bool = False, trusted: bool = False
) -> Any:
    """``torch.load`` with ``weights_only=True`` unless the caller trusts the file."""
    if not os.path.isfile(path):
        raise FormatError(f"{path}: is not a regular file (torch.save writes one file)")
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
        if trusted:
            obj = _torch_load(path, kwargs)
        else:
            with safe_globals.allowed():  # NumPy RNG states through checked stand-ins
                obj = safe_globals.resolve(_torch_load(path, kwargs))
    except pickle.UnpicklingError as exc:
        if trusted:
            raise FormatError(f"{path}: not a readable torch.save file ({exc})") from exc
        raise _refused_by_unpickler(path, exc) from exc
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
    check_object_bytes(obj, os.path.getsize(path), path)
    return obj


def object_bytes(obj: Any, where: str) -> int:
    """Logical bytes of every tensor reachable through dicts, lists, tuples, sets and modules
    (aliases counted each time), walked without recursion; each container is visited once,
    so a self-referencing pickle cannot loop. A ``torch.Size`` holding a dimension beyond 64
    bits (which torch cannot even print) raises :class:`FormatError`."""
    total, seen, stack = 0, set(), [obj]
    while stack:
        item = stack.pop()
        if isinstance(item, torch.Tensor):
            total += _logical_bytes(item)
            continue
        if isinstance(item, torch.Size) and not all(-(2**63) <= d < 2**63 for d in item):
            raise FormatError(f"{where}: a torch.Size holds a dimension beyond 64 bits")
        if not isinstance(item, (dict, list, tuple, set, frozenset, torch.nn.Module)):
            continue
        if id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, torch.nn.Module):  # only from a trusted whole-model pickle
            stack.extend(t for _, t in item.state_dict(keep_vars=True).items())
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        else:
            stack.extend(item)
    return total


def check_object_bytes(obj: Any, real_bytes: int, where: str) -> None:
    """Refuse a loaded object whose tensors (e.g. expanded stride-0 views of one stored
    element) claim far more bytes than the file holds (:func:`bounds.check_expansion`)."""
    bounds.check_expansion(object_bytes(obj, where), real_bytes, where)


def _logical_bytes(tensor: torch.Tensor) -> int:
    """Bytes a pass over ``tensor`` touches: every element of a strided tensor (an expanded
    view counts at full size), the stored values of a sparse one (its dense size is not read)."""
    if tensor.layout == torch.strided:
        return tensor.numel() * tensor.element_size()
    values = tensor._values() if tensor.is_sparse else tensor.values()
    return values.numel() * values.element_size()


def _torch_load(path: str, kwargs: dict[str, Any]) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.load(path, **kwargs)
