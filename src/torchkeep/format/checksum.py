"""Content checksums: xxh3-64, hex encoded, fixed width so headers can be sized in advance."""

from __future__ import annotations

import xxhash

ALGORITHM = "xxh3-64"
HEX_WIDTH = 16
PLACEHOLDER = "0" * HEX_WIDTH


def new_hasher() -> xxhash.xxh3_64:
    """A streaming hasher; ``update`` releases the GIL on large buffers."""
    return xxhash.xxh3_64()


def digest(data: bytes | memoryview) -> str:
    """Checksum of one buffer, as 16 lowercase hex digits."""
    return xxhash.xxh3_64_hexdigest(data)
