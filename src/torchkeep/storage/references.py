"""Incremental steps: a step's state file may take some tensors' bytes from an earlier step.

A tensor that did not change since the manager's previous step (a frozen backbone, an EMA
teacher between updates) is not written again. The step's ``state.tk`` header then carries, in
its ``__metadata__`` under ``torchkeep.refs`` (covered by the header checksum), one record per
such tensor: the earlier step that holds its bytes, the entry key there, dtype, shape, byte
offset and size in that file's data section, and the xxh3 checksum of the bytes. References
always point at the step that really holds the bytes (never at another reference), so reading
one never follows a chain. See docs/run-directory.md.

Everything here is untrusted input: a reference is accepted only to a committed step (a
``step-<10 digits>`` directory, not a link) of the same run directory, numbered below the
referring step; the reader then checks key, dtype, shape, offset, size and checksum against the
target's own validated header before reading a byte.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
from dataclasses import dataclass
from typing import TypeGuard

from ..errors import FormatError, UnsafePathError
from ..format import checksum, header
from ..format.dtypes import ITEMSIZE
from .paths import open_regular

REFS_KEY = "torchkeep.refs"
REFS_FORMAT = "torchkeep.refs/1"
STATE_FILE = "state.tk"
#: More references than this in one header is not a checkpoint torchkeep wrote.
MAX_REFS = 1_000_000
_STEP_DIR = re.compile(r"^step-(\d{10})$")
_HEX = re.compile(rf"^[0-9a-f]{{{checksum.HEX_WIDTH}}}$")


@dataclass(frozen=True)
class TensorRef:
    """Where one tensor's bytes live: entry ``key`` of step ``step``'s state file."""

    step: int
    key: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int
    checksum: str

    def as_json(self) -> dict:
        return {
            "step": self.step,
            "file": STATE_FILE,
            "key": self.key,
            "dtype": self.dtype,
            "shape": list(self.shape),
            "offset": self.offset,
            "nbytes": self.nbytes,
            "checksum": self.checksum,
        }


def encode_refs(refs: dict[str, TensorRef]) -> str:
    """The ``torchkeep.refs`` metadata value for ``refs`` (entry key in this file -> ref)."""
    body = {"format": REFS_FORMAT, "tensors": {k: r.as_json() for k, r in refs.items()}}
    return json.dumps(body, separators=(",", ":"))


def _int(value: object, lo: int, hi: int) -> TypeGuard[int]:
    return type(value) is int and lo <= value <= hi


def _ref(name: str, value: object, where: str) -> TensorRef:
    bad = f"{where}: reference for tensor {name[:80]!r}"
    if not isinstance(value, dict) or value.get("file") != STATE_FILE:
        raise FormatError(f"{bad} is malformed (not a record naming {STATE_FILE})")
    step, key, dtype = value.get("step"), value.get("key"), value.get("dtype")
    shape, offset = value.get("shape"), value.get("offset")
    nbytes, digest = value.get("nbytes"), value.get("checksum")
    if not _int(step, 0, 10**10 - 1):
        raise FormatError(f"{bad}: step {step!r} is not a step number")
    if not isinstance(key, str) or not 0 < len(key) <= 4096:
        raise FormatError(f"{bad}: key is not a tensor name")
    if dtype not in ITEMSIZE:
        raise FormatError(f"{bad}: dtype {dtype!r} is not a safetensors dtype")
    if not isinstance(shape, list) or len(shape) > 64 or not all(_int(d, 0, 2**62) for d in shape):
        raise FormatError(f"{bad}: shape is not a list of sizes")
    if not _int(offset, 0, 2**62) or not _int(nbytes, 0, 2**62):
        raise FormatError(f"{bad}: offset/nbytes are not byte counts")
    if math.prod(shape) * ITEMSIZE[dtype] != nbytes:
        raise FormatError(f"{bad}: nbytes {nbytes} does not match shape {shape} of {dtype}")
    if not isinstance(digest, str) or not _HEX.match(digest):
        raise FormatError(f"{bad}: checksum is not {checksum.ALGORITHM} hex")
    return TensorRef(step, key, dtype, tuple(shape), offset, nbytes, digest)


def parse_refs(metadata: dict[str, str], where: str) -> dict[str, TensorRef]:
    """The validated references of a header's metadata ({} when it has none)."""
    text = metadata.get(REFS_KEY)
    if text is None:
        return {}
    if not isinstance(text, str):
        raise FormatError(f"{where}: {REFS_KEY} is not text")
    try:
        body = header.decode_json(text.encode("utf-8"), where)
    except UnicodeEncodeError as exc:
        raise FormatError(f"{where}: {REFS_KEY} is not text") from exc
    tensors = body.get("tensors")
    if body.get("format") != REFS_FORMAT or not isinstance(tensors, dict):
        raise FormatError(f"{where}: {REFS_KEY} is not a {REFS_FORMAT} table")
    if len(tensors) > MAX_REFS:
        raise FormatError(f"{where}: {REFS_KEY} lists more than {MAX_REFS} tensors")
    return {name: _ref(name, value, where) for name, value in tensors.items()}


def own_step(path: str) -> int | None:
    """The step number of the step directory holding ``path``, or None outside a run dir."""
    parent = os.path.basename(os.path.dirname(os.path.abspath(path)))
    match = _STEP_DIR.match(parent)
    return int(match[1]) if match else None


def target_path(path: str, step: int) -> str:
    """The state file of ``step`` in the run directory holding ``path``, checked to be a
    committed step below the referring one and a real directory (never a link)."""
    mine = own_step(path)
    if mine is None:
        raise FormatError(
            f"{path}: takes tensors from step {step} of its run directory but is not inside "
            "a step directory (step-<number>/); load it from the run directory it was saved in"
        )
    if step >= mine:
        raise FormatError(
            f"{path}: refers to step {step}, which is not earlier than its own step {mine}; "
            "the reference is invalid (the file was tampered with)"
        )
    run = os.path.dirname(os.path.dirname(os.path.abspath(path)))
    folder = os.path.join(run, f"step-{step:010d}")
    try:
        mode = os.lstat(folder).st_mode
    except FileNotFoundError:
        raise FormatError(
            f"{path}: takes tensors from step {step}, which is not in the run directory "
            "(deleted by hand?); restore an older self-contained step"
        ) from None
    if not stat.S_ISDIR(mode):
        raise UnsafePathError(
            f"{folder}: is not a plain step directory (a link or a file); torchkeep does not "
            "follow it"
        )
    return os.path.join(folder, STATE_FILE)


def referenced_steps(step_dir: str) -> set[int]:
    """Steps whose bytes the step at ``step_dir`` uses (empty if its header is unreadable:
    such a step cannot be loaded anyway, and it must not block retention for ever)."""
    path = os.path.join(step_dir, STATE_FILE)
    try:
        fd = open_regular(path)
    except (OSError, UnsafePathError):
        return set()
    try:
        size = os.fstat(fd).st_size
        length = header.parse_length(os.pread(fd, 8, 0), size, path)
        obj = header.decode_json(os.pread(fd, length, 8), path)
        metadata = obj.get(header.METADATA_KEY)
        refs = parse_refs(metadata if isinstance(metadata, dict) else {}, path)
    except (OSError, FormatError):
        return set()
    finally:
        os.close(fd)
    return {r.step for r in refs.values()}
