"""torchkeep as the storage and planning layer of ``torch.distributed.checkpoint`` (DCP).

``dcp.save(state, storage_writer=TorchkeepWriter(path))`` and
``dcp.load(state, storage_reader=TorchkeepReader(path))`` write and read sharded checkpoints as
torchkeep files (safetensors-compatible, checksummed, no pickle) with an atomic commit.
See docs/distributed.md.
"""

from .planners import TorchkeepLoadPlanner, TorchkeepSavePlanner
from .reader import TorchkeepReader
from .writer import TorchkeepWriter

__all__ = [
    "TorchkeepLoadPlanner",
    "TorchkeepReader",
    "TorchkeepSavePlanner",
    "TorchkeepWriter",
]
