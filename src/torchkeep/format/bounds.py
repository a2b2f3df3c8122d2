"""Resource limits on what a file claims, proportional to the file's real size.

A file is small but its numbers are not: a stride-0 view of one stored element can claim
2**40 elements, a dict can hold keys that all hash alike. Every check here costs O(number of
entries or nodes), never O(bytes), and raises :class:`FormatError` naming the file and the
knob that raises the limit (``knobs.MAX_EXPANSION``, ``EXPANSION_FLOOR_BYTES``,
``MAX_HASH_COLLISIONS``; docs/guarantees.md, "Resource limits").
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np

from .. import knobs
from ..errors import FormatError
from .dtypes import ITEMSIZE, override_dtype
from .header import EntryInfo

_DIM_LIMIT = 2**63


def expansion_limit(real_bytes: int) -> int:
    """Most logical tensor bytes a file of ``real_bytes`` bytes may expose."""
    return knobs.MAX_EXPANSION * max(real_bytes, 0) + knobs.EXPANSION_FLOOR_BYTES


def check_expansion(claimed: int, real_bytes: int, where: str) -> None:
    """Refuse a file whose tensors claim more logical bytes than its size allows."""
    limit = expansion_limit(real_bytes)
    if claimed > limit:
        raise FormatError(
            f"{where}: its tensors claim {claimed} bytes but the file holds only {real_bytes}; "
            f"over the limit of {knobs.MAX_EXPANSION} x the file size + "
            f"{knobs.EXPANSION_FLOOR_BYTES} bytes (expanded/stride-0 views or repeated "
            "references). If you trust the file, raise TORCHKEEP_MAX_EXPANSION or "
            "TORCHKEEP_EXPANSION_FLOOR_BYTES"
        )


def dims_numel(dims: Any) -> int | None:
    """Element count of a list of dimensions, or None unless it is a valid shape (rank at most
    ``MAX_RANK``, each dimension an int in [0, 2**63)); Python ints cannot overflow."""
    if not isinstance(dims, (list, tuple)) or len(dims) > knobs.MAX_RANK:
        return None
    if not all(type(d) is int and 0 <= d < _DIM_LIMIT for d in dims):
        return None
    return math.prod(dims)


def node_bytes(node: dict, info: EntryInfo) -> int:
    """Logical bytes a typed-tree tensor node exposes: its view's size, else its entry's.

    Malformed fields count as the entry's size; :func:`reader.materialize` refuses them later.
    """
    view = node.get("view")
    numel = dims_numel(view.get("shape")) if isinstance(view, dict) else None
    if numel is None:
        return info.nbytes
    itemsize = ITEMSIZE[info.dtype]
    if "dtype" in node:
        try:
            itemsize = override_dtype(node["dtype"]).itemsize
        except ValueError:
            return info.nbytes
    return numel * itemsize


def tree_bytes(nodes: Iterable[dict], entries: dict[str, EntryInfo]) -> int:
    """Logical bytes of every tensor node of a typed tree (aliases counted each time)."""
    total = 0
    for node in nodes:
        info = entries.get(node.get("key"))  # type: ignore[arg-type]
        if info is not None:
            total += node_bytes(node, info)
    return total


def check_hash_spread(keys: list, where: str) -> None:
    """Refuse dict/set keys of which more than ``MAX_HASH_COLLISIONS`` share one hash.

    Inserting n keys with equal hashes costs O(n^2) comparisons, and the hashes of ints,
    floats and tuples are predictable (``hash(k * (2**61 - 1)) == 0``). Hashing each key is
    linear; the hashes are then counted by sorting (numpy), which hashes nothing again.
    """
    limit = knobs.MAX_HASH_COLLISIONS
    if len(keys) <= limit:
        return
    hashes = np.fromiter(map(hash, keys), dtype=np.int64, count=len(keys))
    hashes.sort()
    edges = np.flatnonzero(np.diff(hashes)) + 1
    runs = np.diff(np.concatenate(([0], edges, [len(keys)])))
    longest = int(runs.max())
    if longest > limit:
        raise FormatError(
            f"{where}: {longest} of its {len(keys)} keys have the same hash (duplicates or hash "
            f"flooding), over the limit of {limit} (TORCHKEEP_MAX_HASH_COLLISIONS)"
        )


class HashTally:
    """A running count of one container's key hashes, for keys inserted one batch at a time.

    The streaming counterpart of :func:`check_hash_spread` (the pickle scan sees keys as
    opcodes add them): counting is O(1) a key, because the counter's own keys are hash values,
    which never collide with each other (``hash(h) == h`` for every hash value ``h``).
    """

    __slots__ = ("counts",)

    def __init__(self) -> None:
        self.counts: dict[int, int] | None = None  # created on the first key: most have none

    def add(self, hashes: Iterable[int]) -> int:
        """Count ``hashes``; the most keys any one of them is now shared by (0 for none)."""
        counts = self.counts
        if counts is None:
            counts = self.counts = {}
        worst, get = 0, counts.get
        for h in hashes:
            n = get(h, 0) + 1
            counts[h] = n
            if n > worst:
                worst = n
        return worst


def flooded(shared: int) -> bool:
    """Whether ``shared`` keys with one hash value are over ``MAX_HASH_COLLISIONS``."""
    return shared > knobs.MAX_HASH_COLLISIONS
