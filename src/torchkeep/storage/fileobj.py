"""Binary file objects (``io.BytesIO``, ``open(..., "rb"/"wb")``) as save/load sources and targets.

torchkeep reads and writes files by descriptor (``pread`` into tensors, atomic rename), so a file
object is bridged through a private temporary file: a save is written there and then copied to
the object; a load copies the object's bytes (from its current position) there first. A source
must be seekable, as ``torch.load`` requires, so that a failed load leaves its position as it was.
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

CHUNK = 1 << 20


def is_file_object(obj: Any) -> bool:
    """True for objects with ``read`` or ``write`` that are not paths."""
    return not isinstance(obj, (str, bytes, os.PathLike)) and (
        hasattr(obj, "read") or hasattr(obj, "write")
    )


def _refuse_text(obj: Any, what: str) -> None:
    mode = getattr(obj, "mode", "b")
    if isinstance(obj, io.TextIOBase) or (isinstance(mode, str) and "b" not in mode):
        raise TypeError(f"{what} must be opened in binary mode ('rb'/'wb'), not text mode")


@contextmanager
def readable_copy(obj: Any) -> Iterator[str]:
    """A temporary file holding ``obj``'s bytes from its position on; removed afterwards."""
    if not hasattr(obj, "read"):
        raise TypeError(f"cannot load from {type(obj).__name__}: it has no read()")
    _refuse_text(obj, "the file object to load from")
    seekable = getattr(obj, "seekable", None)
    if not (callable(seekable) and seekable()):
        raise ValueError(
            f"cannot load from {type(obj).__name__}: the stream cannot seek (torch.load needs "
            "the same); read it into io.BytesIO(stream.read()) first, or pass a path"
        )
    start = obj.tell()
    with tempfile.TemporaryDirectory(prefix="torchkeep-load-") as folder:
        path = os.path.join(folder, "source")
        with open(path, "wb") as handle:
            shutil.copyfileobj(obj, handle, CHUNK)
        try:
            yield path
        except BaseException:
            obj.seek(start)  # a failed load does not consume the stream
            raise


@contextmanager
def writable_path(obj: Any) -> Iterator[str]:
    """A temporary path to save to; its bytes are copied into ``obj`` once the save succeeded."""
    if not hasattr(obj, "write"):
        raise TypeError(f"cannot save to {type(obj).__name__}: it has no write()")
    _refuse_text(obj, "the file object to save to")
    with tempfile.TemporaryDirectory(prefix="torchkeep-save-") as folder:
        path = os.path.join(folder, "target.tk")
        yield path
        with open(path, "rb") as handle:
            shutil.copyfileobj(handle, obj, CHUNK)
        flush = getattr(obj, "flush", None)
        if callable(flush):
            flush()
