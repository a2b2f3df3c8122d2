"""Whether a directory's filesystem takes direct I/O, for tests that must know which path ran."""

from __future__ import annotations

import os

from torchkeep.storage.io import FileOps


def direct_io_supported(directory: str) -> bool:
    probe = os.path.join(directory, ".direct-probe")
    fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        return FileOps().set_direct(fd, True)
    finally:
        os.close(fd)
        os.unlink(probe)
