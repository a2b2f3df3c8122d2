"""Build and parse the safetensors header, validating every number before it is used.

Layout: ``u64 little-endian N`` + ``N bytes of JSON`` + data. The JSON maps tensor keys to
``{"dtype", "shape", "data_offsets"}`` and holds a string->string ``__metadata__``. torchkeep
stores its format version, typed tree and checksums in that metadata (see docs/format.md).
"""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass, field
from typing import Any

from .. import knobs
from ..errors import FormatError
from . import checksum
from .dtypes import ITEMSIZE

FORMAT_VERSION = "2"
#: Versions this reader understands; they differ only in how the header checksum is computed.
READABLE_VERSIONS = ("1", "2")
META_FORMAT = "format"  # "pt", so Hugging Face loaders accept torchkeep files as PyTorch weights
META_VERSION = "torchkeep.version"
META_TREE = "torchkeep.tree"
META_CHECKSUMS = "torchkeep.checksums"
META_HEADER_SUM = "torchkeep.header_checksum"
METADATA_KEY = "__metadata__"
META_PREFIX = "torchkeep."


@dataclass(frozen=True)
class EntryInfo:
    """A validated tensor entry: dtype name, shape and byte range inside the data section."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass
class Header:
    """Parsed header: entries by key, string metadata, and where the data section starts."""

    entries: dict[str, EntryInfo]
    metadata: dict[str, str]
    data_start: int
    raw: bytes = field(repr=False, default=b"")

    @property
    def is_torchkeep(self) -> bool:
        """Any ``torchkeep.*`` metadata key marks a torchkeep file, so a damaged version key
        makes the file fail loudly instead of loading as unverified plain safetensors."""
        return any(key.startswith(META_PREFIX) for key in self.metadata)


def canonical_digest(entries: dict[str, Any], metadata: dict[str, str]) -> str:
    """Version 1 header checksum: over a canonical JSON re-encoding of entries and metadata.

    Kept to read version-1 files. Re-encoding a 20,000-entry header costs ~25 ms on each save
    and each verified load, which is why version 2 hashes the header bytes as stored instead.
    """
    covered = {k: v for k, v in metadata.items() if k != META_HEADER_SUM}
    canonical = json.dumps(
        {"entries": entries, "metadata": covered}, sort_keys=True, separators=(",", ":")
    )
    return checksum.digest(canonical.encode("utf-8"))


# ``"torchkeep.header_checksum": "<16 hex>"`` as it appears in header JSON. Quotes inside JSON
# strings are escaped, so the pattern can only match the metadata key itself.
_HEADER_SUM_FIELD = re.compile(
    rb'"torchkeep\.header_checksum"[ \t\r\n]*:[ \t\r\n]*"([0-9a-f]{%d})"' % checksum.HEX_WIDTH
)


def _header_sum_span(json_bytes: bytes) -> tuple[int, int] | None:
    """Where the header checksum's hex digits sit in the header JSON (None unless exactly once)."""
    found = list(_HEADER_SUM_FIELD.finditer(json_bytes))
    return found[0].span(1) if len(found) == 1 else None


def raw_digest(json_bytes: bytes) -> str | None:
    """Version 2 header checksum: xxh3-64 of the header JSON bytes as stored (padding included)
    with the checksum's own 16 digits read as ``0``s; None when the field is not found once."""
    span = _header_sum_span(json_bytes)
    if span is None:
        return None
    lo, hi = span
    zeroed = b"".join((json_bytes[:lo], checksum.PLACEHOLDER.encode(), json_bytes[hi:]))
    return checksum.digest(zeroed)


def seal(encoded: bytes) -> bytes:
    """Fill in the header checksum of an encoded header (length prefix + JSON) whose checksum
    field still holds the placeholder; the result has the same length."""
    json_bytes = encoded[8:]
    span = _header_sum_span(json_bytes)
    if span is None or json_bytes[span[0] : span[1]] != checksum.PLACEHOLDER.encode():
        raise AssertionError("torchkeep header has no single placeholder checksum to seal")
    digest = checksum.digest(json_bytes).encode()
    lo, hi = span[0] + 8, span[1] + 8
    return b"".join((encoded[:lo], digest, encoded[hi:]))


def torchkeep_metadata(
    tree_text: str, sums: dict[str, str], user: dict[str, str] | None = None
) -> dict[str, str]:
    """The ``__metadata__`` of a torchkeep file, its header checksum still a placeholder.

    The one place that decides the metadata keys and their order; both writers (whole-object
    and streaming) call it, encode the header, then fill in the checksum with :func:`seal`.
    """
    return {
        META_FORMAT: "pt",
        **(user or {}),
        META_VERSION: FORMAT_VERSION,
        META_TREE: tree_text,
        META_CHECKSUMS: json.dumps(
            {"algorithm": checksum.ALGORITHM, "tensors": sums}, separators=(",", ":")
        ),
        META_HEADER_SUM: checksum.PLACEHOLDER,
    }


def encode_header(entries: dict[str, dict], metadata: dict[str, str]) -> bytes:
    """Serialize a header, padded with spaces so the data section starts aligned."""
    body = {METADATA_KEY: metadata, **entries}
    text = json.dumps(body, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    raw = text.encode("utf-8")
    pad = (-(8 + len(raw))) % knobs.HEADER_ALIGN
    raw += b" " * pad
    return struct.pack("<Q", len(raw)) + raw


# -------------------------------------------------------------------------------- parsing


def reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed in a header")


def no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    out = dict(pairs)  # built in C; a shorter dict than list means a key came twice
    if len(out) != len(pairs):
        seen: set[str] = set()
        key = next(k for k, _ in pairs if k in seen or seen.add(k))  # type: ignore[func-returns-value]
        raise ValueError(f"duplicate key {key!r}")
    return out


def parse_length(prefix: bytes, file_size: int, where: str) -> int:
    """Validate the 8-byte length prefix against the cap and the file size; returns it.

    ``prefix`` holds at least the first 8 bytes; the caller reads the header bytes after this
    check so a hostile length cannot size an allocation.
    """
    if file_size < 8 or len(prefix) < 8:
        raise FormatError(f"{where}: file is {file_size} bytes, too short for a header")
    (length,) = struct.unpack("<Q", prefix[:8])
    if length == 0:
        raise FormatError(f"{where}: header length is 0")
    if length > knobs.MAX_HEADER_BYTES:
        raise FormatError(
            f"{where}: header length {length} exceeds the {knobs.MAX_HEADER_BYTES}-byte cap "
            "(the file is corrupt or not a safetensors/torchkeep file)"
        )
    if 8 + length > file_size:
        raise FormatError(
            f"{where}: header length {length} runs past the end of the {file_size}-byte file "
            "(truncated or corrupt)"
        )
    return length


def decode_json(raw: bytes, where: str) -> dict:
    """Strict JSON: UTF-8, starts with '{', no duplicates, no NaN/Infinity, bounded nesting."""
    if not raw.startswith(b"{"):
        raise FormatError(f"{where}: header does not start with '{{'")
    try:
        text = raw.decode("utf-8")
        value = json.loads(text, object_pairs_hook=no_duplicates, parse_constant=reject_constant)
    except UnicodeDecodeError as exc:
        raise FormatError(f"{where}: header is not valid UTF-8 ({exc.reason})") from exc
    except RecursionError as exc:
        raise FormatError(f"{where}: header nests too deeply") from exc
    except ValueError as exc:
        raise FormatError(f"{where}: header is not valid JSON ({exc})") from exc
    if not isinstance(value, dict):
        raise FormatError(f"{where}: header is not a JSON object")
    return value


def validate(obj: dict, data_size: int, data_start: int, where: str) -> Header:
    """Check every entry and the metadata; returns a :class:`Header` safe to act on."""
    metadata = obj.pop(METADATA_KEY, {})
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise FormatError(f"{where}: __metadata__ must map strings to strings")
    entries = {key: _entry(key, value, where) for key, value in obj.items()}
    _check_contiguous(entries, data_size, where)
    return Header(entries, metadata, data_start)


def _is_int(x: Any) -> bool:
    return type(x) is int


_ENTRY_KEYS = frozenset(("dtype", "shape", "data_offsets"))
_SPAN_LIMIT = 2**63


def _entry(key: str, value: Any, where: str) -> EntryInfo:
    """Validate one entry: a fast path for well-formed entries (20,000-tensor headers), and
    :func:`_entry_checked` for anything it does not accept, which names the problem."""
    if type(value) is dict and value.keys() == _ENTRY_KEYS:
        dtype, shape, offsets = value["dtype"], value["shape"], value["data_offsets"]
        itemsize = ITEMSIZE.get(dtype, 0) if type(dtype) is str else 0
        if (
            itemsize
            and type(shape) is list
            and len(shape) <= knobs.MAX_RANK
            and type(offsets) is list
            and len(offsets) == 2
        ):
            begin, end = offsets
            span = numel = itemsize
            for d in shape:
                if type(d) is not int or d < 0 or span >= _SPAN_LIMIT:
                    break
                span *= d if d > 1 else 1
                numel *= d
            else:
                if (
                    span < _SPAN_LIMIT
                    and type(begin) is int
                    and type(end) is int
                    and 0 <= begin <= end
                    and numel == end - begin
                ):
                    return EntryInfo(dtype, tuple(shape), begin, end)
    return _entry_checked(key, value, where)


def _entry_checked(key: str, value: Any, where: str) -> EntryInfo:
    at = f"{where}: tensor {key!r}"
    if not isinstance(value, dict) or set(value) != {"dtype", "shape", "data_offsets"}:
        raise FormatError(f"{at}: entry must have exactly dtype, shape and data_offsets")
    dtype, shape, offsets = value["dtype"], value["shape"], value["data_offsets"]
    if dtype not in ITEMSIZE:
        raise FormatError(f"{at}: unknown dtype {dtype!r}")
    if not isinstance(shape, list) or len(shape) > knobs.MAX_RANK:
        raise FormatError(f"{at}: shape must be a list of at most {knobs.MAX_RANK} dimensions")
    if not all(_is_int(d) and 0 <= d < 2**63 for d in shape):
        raise FormatError(f"{at}: shape {shape!r} must hold non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_int, offsets))):
        raise FormatError(f"{at}: data_offsets must be two integers")
    begin, end = offsets
    if not 0 <= begin <= end:
        raise FormatError(f"{at}: data_offsets {offsets} are negative or reversed")
    # Zero dimensions do not excuse the others: torch computes strides from the non-zero ones.
    span = ITEMSIZE[dtype]
    for d in shape:
        span *= max(d, 1)
        if span >= 2**63:
            raise FormatError(f"{at}: shape {shape} overflows a 64-bit byte count")
    numel = math.prod(shape)
    if numel * ITEMSIZE[dtype] != end - begin:
        raise FormatError(
            f"{at}: shape {shape} of {dtype} needs {numel * ITEMSIZE[dtype]} bytes but "
            f"data_offsets cover {end - begin}"
        )
    return EntryInfo(dtype, tuple(shape), begin, end)


def _check_contiguous(entries: dict[str, EntryInfo], data_size: int, where: str) -> None:
    position = 0
    for key, info in sorted(entries.items(), key=lambda kv: (kv[1].begin, kv[1].end)):
        if info.begin != position:
            problem = "overlaps the previous tensor" if info.begin < position else "leaves a gap"
            raise FormatError(f"{where}: tensor {key!r} at byte {info.begin} {problem}")
        position = info.end
    if position != data_size:
        if position > data_size:
            raise FormatError(
                f"{where}: tensors need {position} data bytes but the file holds {data_size} "
                "(truncated)"
            )
        raise FormatError(f"{where}: {data_size - position} trailing bytes after the last tensor")
