"""The Lightning plugin for the standalone ``pytorch_lightning`` package.

``pytorch_lightning.Trainer(plugins=[TorchkeepCheckpointIO()])``; the same plugin as
:mod:`torchkeep.integrations.lightning`, built on ``lightning_fabric``'s ``CheckpointIO`` (the
base class ``pytorch_lightning`` checks plugins against).
"""

from __future__ import annotations

from lightning_fabric.plugins import CheckpointIO

from .checkpoint_io import CheckpointIOMixin, lightning_message


class TorchkeepCheckpointIO(CheckpointIOMixin, CheckpointIO):
    """Save and load ``pytorch_lightning`` checkpoints as torchkeep files.

    See :class:`torchkeep.integrations.lightning.TorchkeepCheckpointIO` for the arguments.
    """


__all__ = ["TorchkeepCheckpointIO", "lightning_message"]
