"""Large memory copies for async-save snapshots: streaming stores where the optional C
extension ``torchkeep._streamcopy`` is built, numpy's copy otherwise.

Why: a snapshot's destination is not read again until the background write, so plain stores
waste a third of the memory traffic reading destination lines first (see the extension's
source). On the benchmark VM a 1.28 GB snapshot shared by two threads took 53-55 ms with
streaming stores against 76-80 ms with ``np.copyto`` (``knobs.STREAMING_COPY``). The extension
uses AVX2 stores where the CPU has them, SSE2 otherwise (``_streamcopy.LEVEL``).
"""

from __future__ import annotations

import numpy as np

from .. import knobs

try:
    from .. import _streamcopy
except ImportError:  # built without a C compiler: numpy's copy does the same job, slower
    _streamcopy = None


def streaming_available() -> bool:
    """Whether large copies use streaming stores (extension built, x86-64, knob on)."""
    return _streamcopy is not None and _streamcopy.LEVEL > 0 and bool(knobs.STREAMING_COPY)


def copy_bytes(dst: np.ndarray, src: np.ndarray) -> None:
    """Copy the contiguous byte array ``src`` into ``dst`` (same size); releases the GIL."""
    if streaming_available():
        _streamcopy.copy(dst, src)
    else:
        np.copyto(dst, src)
