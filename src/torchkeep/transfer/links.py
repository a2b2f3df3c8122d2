"""The tensors a step's file takes from earlier steps of its run directory (incremental steps).

:class:`Links` opens the state file of every step a file refers to (``storage/references.py``
validates the records and the paths) and checks each reference against that file's own
validated header: the key must be a real entry there (never another reference), with the same
dtype, shape, offset and size, and the checksum stored there must be the one recorded here.
Only then are reads handed to that file, which verifies the bytes with that checksum.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..errors import FormatError
from ..format.header import EntryInfo
from ..storage.references import TensorRef, target_path


class Links:
    """References of one file (entry key here -> :class:`TensorRef`) and the files they use."""

    def __init__(self, path: str, refs: dict[str, TensorRef]) -> None:
        self.path = path
        self.refs = refs
        self.readers: dict[int, Any] = {}

    def open(self, opener: Callable[..., Any], local: dict[str, EntryInfo]) -> None:
        """Open and check every referenced file with ``opener`` (the reader class)."""
        clash = next((k for k in self.refs if k in local), None)
        if clash is not None:
            raise FormatError(
                f"{self.path}: tensor {clash[:80]!r} is both stored here and referenced from "
                "another step; the file is malformed"
            )
        for step in sorted({r.step for r in self.refs.values()}):
            self.readers[step] = opener(
                target_path(self.path, step), follow_symlinks=False, links=False
            )
        for name, ref in self.refs.items():
            self._check(name, ref, self.readers[ref.step])

    def _check(self, name: str, ref: TensorRef, reader: Any) -> None:
        info = reader.header.entries.get(ref.key)
        where = f"{self.path}: tensor {name[:80]!r} refers to {reader.path} entry {ref.key[:80]!r}"
        if info is None:
            raise FormatError(f"{where}, which that file does not hold")
        if (info.dtype, tuple(info.shape), info.begin, info.nbytes) != (
            ref.dtype,
            ref.shape,
            ref.offset,
            ref.nbytes,
        ):
            raise FormatError(
                f"{where}, but dtype/shape/offset/size differ ({info.dtype} {list(info.shape)} "
                f"at {info.begin}+{info.nbytes} there); the reference is invalid"
            )
        if reader.checksums.get(ref.key) != ref.checksum:
            raise FormatError(
                f"{where}, but the checksum recorded here ({ref.checksum}) is not the one "
                "stored there; the reference is invalid"
            )

    def target(self, name: str) -> tuple[Any, str]:
        """The open file holding tensor ``name`` and its key there."""
        ref = self.refs[name]
        reader = self.readers.get(ref.step)
        if reader is None:
            raise FormatError(
                f"{self.path}: tensor {name[:80]!r} is held by step {ref.step}, which was not "
                "opened (open this file with links=True)"
            )
        return reader, ref.key

    def read_linked(
        self, items: list[tuple[str, torch.Tensor]], verify: bool
    ) -> list[tuple[str, torch.Tensor]]:
        """Read the referenced ``items`` from their files; returns the ones stored here."""
        local: list[tuple[str, torch.Tensor]] = []
        by_reader: dict[int, tuple[Any, list[tuple[str, torch.Tensor]]]] = {}
        for key, out in items:
            if key in self.refs:
                reader, target = self.target(key)
                by_reader.setdefault(id(reader), (reader, []))[1].append((target, out))
            else:
                local.append((key, out))
        for reader, linked in by_reader.values():
            reader.read_many(linked, verify)
        return local

    def close(self) -> None:
        for reader in self.readers.values():
            reader.close()
        self.readers = {}
