"""Check that the chunks of a sharded tensor tile its global shape exactly.

Each chunk is a box (offsets, sizes) inside the tensor. A valid checkpoint's chunks stay inside
the tensor, never overlap, and together cover every element: no overlap plus a total volume
equal to the tensor's element count means exact cover. A hostile or damaged metadata file that
breaks any of these would make a load read the wrong bytes or leave parts of a tensor unset.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch.distributed.checkpoint.metadata import ChunkStorageMetadata


def check_chunks(fqn: str, shape: Sequence[int], chunks: Sequence[ChunkStorageMetadata]) -> None:
    """Raise ``ValueError`` naming ``fqn`` unless ``chunks`` tile ``shape`` exactly."""
    what = f"tensor {fqn!r}"
    for i, chunk in enumerate(chunks):
        if len(chunk.offsets) != len(shape) or len(chunk.sizes) != len(shape):
            raise ValueError(
                f"{what}: chunk {i} has {len(chunk.offsets)} offsets and {len(chunk.sizes)} "
                f"sizes for a tensor of {len(shape)} dimensions"
            )
        for d, (o, s, n) in enumerate(zip(chunk.offsets, chunk.sizes, shape)):
            if o + s > n:
                raise ValueError(
                    f"{what}: chunk {i} (offsets {list(chunk.offsets)}, sizes "
                    f"{list(chunk.sizes)}) reaches outside the global shape {list(shape)} "
                    f"in dimension {d}"
                )
    _check_overlap(what, shape, chunks)
    numel = math.prod(shape)
    covered = sum(math.prod(c.sizes) for c in chunks)
    if covered != numel:
        raise ValueError(
            f"{what}: its chunks cover {covered} of {numel} elements of shape {list(shape)}; "
            "a shard is missing"
        )


def _check_overlap(what: str, shape: Sequence[int], chunks: Sequence[ChunkStorageMetadata]) -> None:
    """Sweep along the first dimension: only chunks whose first-dimension ranges intersect are
    compared box against box (row-sharded layouts compare each chunk with one neighbour)."""
    if not shape:
        if len(chunks) > 1:
            raise ValueError(f"{what}: a 0-dimensional tensor has {len(chunks)} chunks")
        return
    order = sorted(
        (i for i, c in enumerate(chunks) if math.prod(c.sizes)), key=lambda i: chunks[i].offsets[0]
    )
    for pos, i in enumerate(order):
        a = chunks[i]
        end = a.offsets[0] + a.sizes[0]
        for j in order[pos + 1 :]:
            b = chunks[j]
            if b.offsets[0] >= end:
                break
            if _boxes_meet(a, b):
                raise ValueError(
                    f"{what}: chunks at offsets {list(a.offsets)} and {list(b.offsets)} overlap"
                )


def _boxes_meet(a: ChunkStorageMetadata, b: ChunkStorageMetadata) -> bool:
    return all(
        ao < bo + bs and bo < ao + as_
        for ao, as_, bo, bs in zip(a.offsets, a.sizes, b.offsets, b.sizes)
    )
