"""Lightning ``CheckpointIO`` plugin: every checkpoint Lightning writes becomes a torchkeep file.

``Trainer(plugins=[TorchkeepCheckpointIO()])`` routes ``ModelCheckpoint``,
``trainer.save_checkpoint`` and ``trainer.fit(ckpt_path=...)`` through torchkeep: files are
written atomically (temporary file, fsync, rename), carry per-tensor checksums that are verified
on load, and contain no pickle. The file keeps Lightning's name (``last.ckpt``,
``epoch=1-step=20.ckpt``) so ``ckpt_path="last"`` and ``ModelCheckpoint``'s bookkeeping work
unchanged. Loading also accepts Lightning's own pickled ``.ckpt`` files, read with the
weights-only rules (pass ``trusted=True`` for checkpoints that need more).

``async_save=True`` returns from each save once the tensors are snapshotted and writes in the
background on torchkeep's pipeline; Lightning's ``AsyncCheckpointIO(TorchkeepCheckpointIO())``
wrapper works too.
"""

from __future__ import annotations

from lightning.fabric.plugins import CheckpointIO

from .checkpoint_io import CheckpointIOMixin, lightning_message


class TorchkeepCheckpointIO(CheckpointIOMixin, CheckpointIO):
    """Save and load Lightning checkpoints as torchkeep files (atomic, verified, pickle-free).

    Args:
        async_save: write in the background after snapshotting the tensors (one save in
            flight; the next save, a load, a removal of the same file and ``teardown`` wait).
        trusted: let :meth:`load_checkpoint` fully unpickle legacy ``.ckpt`` files; torchkeep
            files never need it.
        verify: check every tensor's checksum on load.
    """


__all__ = ["TorchkeepCheckpointIO", "lightning_message"]
