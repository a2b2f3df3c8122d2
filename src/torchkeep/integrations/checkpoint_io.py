"""The body of torchkeep's Lightning ``CheckpointIO`` plugins, free of any framework import.

``integrations/lightning.py`` (the ``lightning`` package) and
``integrations/pytorch_lightning.py`` (the standalone ``pytorch_lightning`` package) each mix it
into their framework's ``CheckpointIO`` base class; the behaviour is documented there.
"""

from __future__ import annotations

import os
import shutil
import threading
import uuid
from typing import Any

from .. import SaveHandle, UnsupportedValueError, load, save, save_async

_HINTS = {
    "hyper_parameters": "pass plain values (numbers, strings, lists, dicts) to "
    "save_hyperparameters(), or leave objects out with save_hyperparameters(ignore=[...])",
    "datamodule_hyper_parameters": "pass plain values to the DataModule's save_hyperparameters()",
    "callbacks": "make that callback's state_dict() return plain values and tensors",
    "optimizer_states": "the optimizer's state_dict() holds an object; convert it to plain values",
    "lr_schedulers": "the scheduler's state_dict() holds an object (a lambda or a callable "
    "object); give it a state_dict() of plain values",
}


class CheckpointIOMixin:
    """Save and load Lightning checkpoints as torchkeep files (atomic, verified, pickle-free).

    Args:
        async_save: write in the background after snapshotting the tensors (one save in
            flight; the next save, a load, a removal of the same file and ``teardown`` wait).
        trusted: let :meth:`load_checkpoint` fully unpickle legacy ``.ckpt`` files; torchkeep
            files never need it.
        verify: check every tensor's checksum on load.
    """

    def __init__(self, async_save: bool = False, trusted: bool = False, verify: bool = True):
        self.async_save = async_save
        self.trusted = trusted
        self.verify = verify
        self._pending: dict[str, SaveHandle] = {}
        self._lock = threading.Lock()

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        """Write ``checkpoint`` to ``path`` as a torchkeep file (Lightning's file name kept)."""
        if storage_options is not None:
            raise TypeError(
                "TorchkeepCheckpointIO.save_checkpoint takes no storage_options; got "
                f"{storage_options!r}"
            )
        path = os.path.abspath(os.fspath(path))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            if self.async_save:
                # torchkeep keeps one save in flight, so save_async would wait for the previous
                # one anyway; waiting here also raises its error instead of dropping it.
                self.wait()
                handle = save_async(checkpoint, path)
                with self._lock:
                    self._pending[path] = handle
            else:
                save(checkpoint, path)
        except UnsupportedValueError as exc:
            raise UnsupportedValueError(lightning_message(path, exc)) from exc

    def load_checkpoint(
        self, path: Any, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        """Read a torchkeep file (checksums verified) or a Lightning ``.ckpt`` (weights-only).

        ``map_location`` may be a device, a string or a dict; a callable (Lightning passes
        ``lambda storage, loc: storage``) loads to CPU, where Lightning moves states itself.
        """
        path = os.fspath(path)
        self._wait(os.path.abspath(path))
        location = "cpu" if callable(map_location) else map_location
        trusted = self.trusted or weights_only is False
        return load(path, map_location=location, verify=self.verify, trusted=trusted)

    def remove_checkpoint(self, path: Any) -> None:
        """Remove a checkpoint atomically: rename it aside, delete it, fsync the folder.

        A crash leaves either the checkpoint under its name or a hidden ``.removing`` leftover,
        never a partly deleted checkpoint under the real name.
        """
        path = os.path.abspath(os.fspath(path))
        self._wait(path)
        if not os.path.lexists(path):
            return
        folder, name = os.path.split(path)
        aside = os.path.join(folder, f".{name}.removing-{uuid.uuid4().hex[:8]}")
        os.replace(path, aside)
        _fsync_dir(folder)
        if os.path.isdir(aside) and not os.path.islink(aside):
            shutil.rmtree(aside)  # a folder checkpoint written by another plugin
        else:
            os.unlink(aside)

    def teardown(self) -> None:
        """Wait for background saves; raise the first error one of them hit."""
        self.wait()

    def wait(self) -> None:
        """Block until every background save has committed (errors re-raised)."""
        with self._lock:
            handles = list(self._pending.values())
            self._pending.clear()
        errors = [h.exception() for h in handles]
        first = next((e for e in errors if e is not None), None)
        if first is not None:
            raise first

    def _wait(self, path: str) -> None:
        with self._lock:
            handle = self._pending.pop(path, None)
        if handle is not None:
            handle.wait()


def lightning_message(path: str, exc: UnsupportedValueError) -> str:
    """The refusal, naming the checkpoint key and how to make it storable."""
    detail = str(exc)
    top = detail.split(":", 1)[0].split(".", 1)[0].split("[", 1)[0]
    hint = _HINTS.get(top, "convert the value to plain numbers/strings/tensors")
    return (
        f"{path}: Lightning checkpoint key {top!r} holds a value a torchkeep file cannot store "
        f"without pickle ({detail}). To fix: {hint}; or save this run with Lightning's "
        "TorchCheckpointIO instead"
    )


def _fsync_dir(folder: str) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
