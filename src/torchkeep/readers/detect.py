"""Recognize a checkpoint's format from its content (not its extension)."""

from __future__ import annotations

import os

from ..errors import CheckpointNotFoundError, FormatError

SAFETENSORS = "safetensors"
TORCH_ZIP = "torch-zip"
TORCH_LEGACY = "torch-legacy"


def sniff_file(path: str) -> str:
    """Format name of a single file, judged by its first bytes."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(4096)
    except FileNotFoundError:
        raise CheckpointNotFoundError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise FormatError(f"{path}: is a directory, not a checkpoint file") from None
    if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
        return TORCH_ZIP
    if len(head) >= 9 and head[8:9] == b"{":
        return SAFETENSORS  # torchkeep files are safetensors files; FileReader tells them apart
    if head[:1] == b"\x80" or head[:1] in (b"(", b"}", b"]", b"c"):
        return TORCH_LEGACY
    raise FormatError(
        f"{path}: not a recognized checkpoint (not torchkeep, safetensors or torch.save); "
        f"first bytes {head[:8]!r}"
    )


def sniff(path: str | os.PathLike) -> str:
    """Format of a file or directory checkpoint."""
    path = os.fspath(path)
    if not os.path.lexists(path):
        raise CheckpointNotFoundError(f"{path}: no such file or directory")
    if os.path.isdir(path):
        raise FormatError(f"{path}: directory checkpoints are not recognized here")
    return sniff_file(path)
