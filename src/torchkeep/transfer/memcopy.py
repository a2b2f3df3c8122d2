"""Large memory copies for async-save snapshots: streaming stores where the optional C
extension ``torchkeep._streamcopy`` is built, numpy's copy otherwise.

Why: a snapshot's destination is not read again until the background write, so plain stores
waste a third of the memory traffic reading destination lines first (see the extension's
source). On the benchmark VM a 1.28 GB snapshot shared by two threads took 53-55 ms with
streaming stores against 76-80 ms with ``np.copyto`` (``knobs.STREAMING_COPY``). The extension
uses AVX2 stores where the CPU has them, SSE2 otherwise (``_streamcopy.LEVEL``).
"""

from __future__ import annotations

from types import ModuleType

import numpy as np

from .. import knobs
from ..format import checksum

_streamcopy: ModuleType | None
try:
    from .. import _streamcopy
except ImportError:  # built without a C compiler: numpy's copy does the same job, slower
    _streamcopy = None


def streaming_available() -> bool:
    """Whether large copies use streaming stores (extension built, x86-64, knob on)."""
    return _streamcopy is not None and _streamcopy.LEVEL > 0 and bool(knobs.STREAMING_COPY)


def describe() -> str:
    """One line saying which copy async-save snapshots use (``torchkeep --version``)."""
    if _streamcopy is None:
        return "streaming-copy C extension: not built; snapshots copy with numpy (slower)"
    level = ("memcpy", "SSE2", "AVX2")[min(max(_streamcopy.LEVEL, 0), 2)]
    state = "on" if streaming_available() else "off (TORCHKEEP_STREAMING_COPY=0 or no SIMD)"
    return f"streaming-copy C extension: built ({level} stores), {state}"


def copy_bytes(dst: np.ndarray, src: np.ndarray) -> None:
    """Copy the contiguous byte array ``src`` into ``dst`` (same size); releases the GIL."""
    ext = _streamcopy
    if ext is not None and streaming_available():
        ext.copy(dst, src)
    else:
        np.copyto(dst, src)


def copy_and_hash(dst: np.ndarray, src: np.ndarray) -> str:
    """:func:`copy_bytes`, also returning the checksum (``format.checksum``) of the bytes.

    Each piece of ``SNAPSHOT_HASH_PIECE_BYTES`` is hashed right after it was copied, from the
    source, which the copy has just brought into the cache: the checksum costs no second read
    from memory. The bytes hashed are those the copy read unless the source changes between
    the two (a few microseconds); a tensor written in place during a snapshot is what the
    overlapped snapshot's version guard reports, and a write the guard cannot see leaves a
    checksum that does not match the copy, so the file fails verification rather than load a
    silently mixed state.
    """
    hasher = checksum.new_hasher()
    step = max(1, knobs.SNAPSHOT_HASH_PIECE_BYTES)
    for lo in range(0, src.nbytes, step):
        piece = src[lo : lo + step]
        copy_bytes(dst[lo : lo + step], piece)
        hasher.update(piece.data)  # the array's buffer, no copy
    return hasher.hexdigest()
