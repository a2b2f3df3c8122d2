"""torchkeep as the storage and planning layer of ``torch.distributed.checkpoint`` (DCP).

``dcp.save(state, storage_writer=TorchkeepWriter(path))`` and
``dcp.load(state, storage_reader=TorchkeepReader(path))`` write and read sharded checkpoints as
torchkeep files (safetensors-compatible, checksummed, no pickle) with an atomic commit.
``save(state, path)`` / ``load(state, path)`` do the same for a whole training state (model,
optimizer via DCP's ``get_state_dict``, other objects, per-rank RNG and data-loader state).
See docs/distributed.md.
"""

from .api import RankStateSkipped, checkpoint_group, load, save
from .check import describe, verify
from .planners import TorchkeepLoadPlanner, TorchkeepSavePlanner
from .reader import TorchkeepReader
from .steps import latest_step, restore, save_step, step_path, steps
from .writer import TorchkeepWriter

__all__ = [
    "RankStateSkipped",
    "checkpoint_group",
    "describe",
    "latest_step",
    "restore",
    "save_step",
    "step_path",
    "steps",
    "verify",
    "load",
    "save",
    "TorchkeepLoadPlanner",
    "TorchkeepReader",
    "TorchkeepSavePlanner",
    "TorchkeepWriter",
]
