"""DCP planners that keep non-tensor values out of pickles.

DCP's default save planner turns every non-tensor value (a step counter, a learning-rate
schedule's dict) into ``torch.save`` bytes, and its load planner ``torch.load``s them with
``weights_only=False``: a checkpoint from someone else can run code. With torchkeep's storage
those values live in the typed tree of the shard files instead; these planners make that
explicit on both ends. The save planner checks up front, before any rank writes a byte, that
every value can be stored; the load planner takes decoded objects and refuses raw bytes.
"""

from __future__ import annotations

import io
from typing import Any

from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.planner import ReadItem, SavePlan, WriteItemType

from ..errors import UnsafeFileError
from ..format.tree import encode


class TorchkeepSavePlanner(DefaultSavePlanner):
    """DCP's default save planning (flattening, dedup of replicated tensors, DTensor chunks),
    plus an early check that every non-tensor value fits torchkeep's typed tree."""

    def create_local_plan(self) -> SavePlan:
        plan = super().create_local_plan()
        for item in plan.items:
            if item.type == WriteItemType.BYTE_IO:
                value = self.lookup_object(item.index)
                encode({item.index.fqn: value})  # raises UnsupportedValueError naming the key
        return plan


class TorchkeepLoadPlanner(DefaultLoadPlanner):
    """DCP's default load planning (resharding, flattening) that receives non-tensor values as
    decoded objects from torchkeep's reader and never unpickles bytes."""

    def load_value(self, read_item: ReadItem, value: Any) -> None:
        """Put a decoded non-tensor value where DCP's ``load_bytes`` would have put it."""
        fqn = read_item.dest_index.fqn
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[fqn], value)
        else:
            self.state_dict[fqn] = value

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        raise UnsafeFileError(
            f"{read_item.dest_index.fqn}: the storage reader handed over pickled bytes; "
            "torchkeep's load planner never unpickles. Read the checkpoint with "
            "torchkeep.distributed.TorchkeepReader, or use DCP's own planner if you trust it."
        )
