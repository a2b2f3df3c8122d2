"""Open what a CLI command was pointed at: a torchkeep sharded checkpoint (from
``torchkeep.distributed``) or any format ``readers.open`` knows."""

from __future__ import annotations

import os

from ..readers.open import open_view as open_reader_view
from ..readers.view import CheckpointView

#: The metadata file that marks a torchkeep sharded checkpoint (distributed/metadata.py).
SHARDED_METADATA = "checkpoint.json"


def is_sharded(path: str | os.PathLike) -> bool:
    """True for a torchkeep sharded checkpoint directory (``torchkeep.distributed``)."""
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, SHARDED_METADATA))


def open_view(path: str | os.PathLike, trusted: bool = False) -> CheckpointView:
    """The view of ``path``; sharded steps are seen as whole tensors, verified chunk by chunk."""
    if is_sharded(path):
        # Imported here, not at the top: torch.distributed.checkpoint adds seconds to every
        # CLI start, and only sharded checkpoints need it.
        from ..distributed.view import ShardedView

        return ShardedView(path)
    return open_reader_view(path, trusted=trusted)
