"""Read torchkeep and plain safetensors files: validated header, lazy tensors, verified bytes.

Opening a file reads and validates only the header, so opening is cheap whatever the file size.
Tensors are read on demand, either copied with ``readinto`` (checksummed chunk by chunk while the
bytes are hot in cache) or mapped with ``mmap``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Callable
from typing import Any, cast

import torch

from .. import knobs
from ..errors import CorruptionError, FormatError, TorchkeepError
from ..format import bounds, checksum, header
from ..format.dtypes import SAFETENSORS_TO_TORCH, override_dtype
from ..format.header import EntryInfo, Header
from ..format.memory import byte_view
from ..format.tree import TAG
from ..format.tree_decode import decode, iter_tensor_nodes
from ..storage.paths import open_regular
from ..storage.references import parse_refs
from ..storage.urls import backend_for, is_url
from . import hashing
from .gcpause import paused_gc
from .links import Links
from .parallel_read import plan_reads, run_reads

MapLocation = Any  # None | str | torch.device | dict[str, str]


class FileReader:
    """An open torchkeep/safetensors file. Use as a context manager, or call :meth:`close`."""

    def __init__(
        self,
        path: str | os.PathLike,
        storage_options: dict[str, Any] | None = None,
        *,
        follow_symlinks: bool = True,
        links: bool = True,
    ) -> None:
        """Open ``path`` (a local file or an fsspec URL); ``follow_symlinks=False`` for files
        found in a directory (a link there could lead outside it). Anything but a regular file
        is refused. A step of an incremental run takes some tensors from earlier steps
        (``storage/references.py``): those files are opened and checked too, unless
        ``links=False`` (then those tensors cannot be read)."""
        self.path = os.fspath(path)
        #: The object store of a URL (ranged reads through fsspec), None for a local file.
        self.remote: Any = None
        if is_url(self.path):
            self.remote = backend_for(self.path, storage_options)
            self._fd = -1
        else:
            self._fd = open_regular(self.path, follow_symlinks=follow_symlinks)
        self.links = Links(self.path, {})
        try:
            self.size = self.remote.size(self.path) if self.remote else os.fstat(self._fd).st_size
            with paused_gc():  # a header can hold tens of thousands of small dicts
                self.header = self._read_header()
                self.checksums = self._read_checksums()
                refs = parse_refs(self.header.metadata, self.path) if self.is_torchkeep else {}
                if refs and self.remote is not None:
                    raise FormatError(
                        f"{self.path}: refers to tensors of other steps (an incremental step); "
                        "such references are only followed inside a local run directory"
                    )
                self.links = Links(self.path, refs)
                self.tree = self._read_tree()
            if links and refs:
                self.links.open(FileReader, self.header.entries)
        except BaseException:
            self.close()
            raise
        self._mapped: torch.Tensor | None = None

    # -- opening ---------------------------------------------------------------------------
    def _pread(self, size: int, offset: int) -> bytes:
        if self.remote is not None:
            return self.remote.read_range(self.path, offset, size)
        chunks, done = [], 0
        while done < size:
            piece = os.pread(self._fd, min(size - done, 1 << 30), offset + done)
            if not piece:
                raise FormatError(f"{self.path}: unexpected end of file at byte {offset + done}")
            chunks.append(piece)
            done += len(piece)
        return b"".join(chunks)

    def _read_header(self) -> Header:
        prefix = self._pread(min(8, self.size), 0) if self.size else b""
        length = header.parse_length(prefix, self.size, self.path)
        raw = self._pread(length, 8)
        obj = header.decode_json(raw, self.path)
        parsed = header.validate(obj, self.size - 8 - length, 8 + length, self.path)
        parsed.raw = raw
        return parsed

    @property
    def is_torchkeep(self) -> bool:
        """True for a torchkeep file, False for a plain safetensors file."""
        return self.header.is_torchkeep

    def _meta_json(self, name: str) -> Any:
        text = self.header.metadata.get(name)
        if text is None:
            raise FormatError(f"{self.path}: torchkeep metadata {name!r} is missing")
        return _strict_json(text, f"{self.path}: {name}")

    def _read_checksums(self) -> dict[str, str]:
        meta = self.header.metadata
        if not self.is_torchkeep:
            return {}
        version = meta.get(header.META_VERSION)
        if version not in header.READABLE_VERSIONS:
            raise FormatError(
                f"{self.path}: torchkeep format version {version!r} is not supported by this "
                f"torchkeep (reads versions {', '.join(header.READABLE_VERSIONS)}); "
                "upgrade torchkeep"
            )
        stored = meta.get(header.META_HEADER_SUM)
        if stored is None or stored != self._header_digest(version):
            raise CorruptionError(
                f"{self.path}: the header checksum does not match (the header is corrupt); "
                "restore this file from a good copy"
            )
        sums = self._meta_json(header.META_CHECKSUMS)
        if not isinstance(sums, dict):
            raise FormatError(f"{self.path}: checksum table is malformed")
        tensors = sums.get("tensors")
        if sums.get("algorithm") != checksum.ALGORITHM or not isinstance(tensors, dict):
            raise FormatError(f"{self.path}: checksum table is malformed")
        if set(tensors) != set(self.header.entries) or not all(
            isinstance(v, str) for v in tensors.values()
        ):
            raise FormatError(f"{self.path}: checksum table does not list exactly the tensors")
        return tensors

    def _header_digest(self, version: str) -> str | None:
        """The header checksum this file should carry, computed as its version defines it."""
        if version == "1":
            entries = {
                k: {"dtype": e.dtype, "shape": list(e.shape), "data_offsets": [e.begin, e.end]}
                for k, e in self.header.entries.items()
            }
            return header.canonical_digest(entries, self.header.metadata)
        return header.raw_digest(self.header.raw)

    def _read_tree(self) -> Any:
        if not self.is_torchkeep:
            # Plain safetensors: a flat dict of its tensors, in file order.
            ordered = sorted(self.header.entries.items(), key=lambda kv: kv[1].begin)
            return {TAG: "dict", "v": {k: {TAG: "tensor", "key": k} for k, _ in ordered}}
        tree = self._meta_json(header.META_TREE)
        nodes = iter_tensor_nodes(tree, self.path)
        for path, node in nodes:
            key = node.get("key")
            if not isinstance(key, str) or (
                key not in self.header.entries and key not in self.links.refs
            ):
                raise FormatError(
                    f"{self.path}: value {path or '<root>'} refers to tensor {key!r}, "
                    "which is not in the file"
                )
        claimed = bounds.tree_bytes((node for _, node in nodes), self.header.entries)
        bounds.check_expansion(claimed, self.size, self.path)  # views cannot amplify the file
        return tree

    # -- reading tensors ----------------------------------------------------------------------
    def keys(self) -> list[str]:
        """Every tensor key: this file's entries, then those held by earlier steps."""
        return [*self.header.entries, *self.links.refs]

    @property
    def metadata(self) -> dict[str, str]:
        """A copy of the file's ``__metadata__`` strings."""
        return dict(self.header.metadata)

    def entry(self, key: str) -> EntryInfo:
        """The header's record of entry ``key`` (dtype, shape, byte range), following a link
        to an earlier step; KeyError names the file when there is none."""
        if key in self.links.refs:
            reader, target = self.links.target(key)
            return reader.entry(target)
        try:
            return self.header.entries[key]
        except KeyError:
            raise KeyError(f"{self.path}: no tensor named {key!r}") from None

    def read_into(self, key: str, out: torch.Tensor, verify: bool = True) -> None:
        """Copy entry ``key``'s bytes into the contiguous CPU tensor ``out`` (same byte size)."""
        self.read_many([(key, out)], verify)

    def read_many(self, items: list[tuple[str, torch.Tensor]], verify: bool = True) -> None:
        """Copy several entries into contiguous CPU tensors, reading in parallel.

        Reads run on a small thread pool (``preadv`` releases the GIL) while this thread
        checksums the chunks already read, so verification rides along with the copy.
        Neighbouring small entries are read with one call. Raises :class:`CorruptionError`
        naming the first entry whose checksum does not match.
        """
        if self.links.refs:
            items = self.links.read_linked(items, verify)
        with paused_gc():
            jobs = plan_reads(self, items)
        if not jobs:
            return
        with contextlib.suppress(OSError, AttributeError):
            os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        run_reads(self, jobs, bool(verify and self.checksums))

    def _preadinto(self, buf: memoryview, offset: int) -> None:
        if self.remote is not None:
            self.remote.read_into(self.path, [(offset, buf)])
            return
        done = 0
        while done < buf.nbytes:
            try:
                n = os.preadv(self._fd, [buf[done:]], offset + done)
            except InterruptedError:
                continue
            if n <= 0:
                raise FormatError(f"{self.path}: unexpected end of file at byte {offset + done}")
            done += n

    def _check(self, key: str, actual: str) -> None:
        expected = self.checksums.get(key)
        if expected is not None and actual != expected:
            raise CorruptionError(
                f"{self.path}: tensor {key!r} is corrupt (checksum {actual} != stored {expected}); "
                "restore this file from a good copy"
            )

    def read_entry(self, key: str, verify: bool = True) -> torch.Tensor:
        """A fresh CPU tensor with entry ``key``'s content, in its stored dtype and shape."""
        info = self.entry(key)
        out = torch.empty(info.shape, dtype=SAFETENSORS_TO_TORCH[info.dtype])
        self.read_into(key, out, verify)
        return out

    def map_entry(self, key: str, verify: bool = False) -> torch.Tensor:
        """Entry ``key`` as a tensor backed by a private memory map of the file (no copy).

        An object has no memory map: a URL's entry is read (verified when asked) instead.
        """
        if key in self.links.refs:
            reader, target = self.links.target(key)
            return reader.map_entry(target, verify)
        if self.remote is not None:
            return self.read_entry(key, verify)
        info = self.entry(key)
        if self._mapped is None:
            # torch's stub types from_file loosely; on UntypedStorage it returns one.
            storage = cast(
                torch.UntypedStorage,
                torch.UntypedStorage.from_file(self.path, shared=False, nbytes=self.size),
            )
            self._mapped = torch.empty(0, dtype=torch.uint8).set_(storage)
        start = self.header.data_start + info.begin
        raw = self._mapped[start : start + info.nbytes]
        if verify and self.checksums:
            self._check(key, checksum.digest(byte_view(raw)))
        dtype = SAFETENSORS_TO_TORCH[info.dtype]
        try:
            return raw.view(dtype).reshape(info.shape)
        except RuntimeError:  # misaligned entry in a foreign file: fall back to a copy
            return raw.clone().view(dtype).reshape(info.shape)

    def verify_entry(self, key: str) -> None:
        """Hash entry ``key`` from disk and raise :class:`CorruptionError` on mismatch.

        Reads with ``pread`` through one small buffer (``READ_PIECE_BYTES``, hot in the CPU
        cache), never a mapping: a lazily loaded file's pages do not become resident here.
        """
        if key in self.links.refs:
            reader, target = self.links.target(key)
            return reader.verify_entry(target)
        info = self.entry(key)
        span = (key, self.header.data_start + info.begin, info.nbytes)
        self._check(key, hashing.buffered_digests(self._preadinto, [span], self._piece)[key])

    def verify_many(self, keys: list[str]) -> None:
        """Verify the checksums of ``keys`` before anything is copied anywhere.

        Keys referring to another step's file are verified in that file. Raises
        :class:`CorruptionError` naming the first corrupt entry (in file order).
        """
        local, linked = self._by_file(keys)
        for reader, pairs in linked:
            reader.verify_many([target for target, _ in pairs])
        sums = self._digests(local)
        for key in sorted(local, key=lambda k: self.entry(k).begin):
            self._check(key, sums[key])

    def corrupt_entries(self) -> list[str]:
        """Keys of every entry whose checksum does not match (empty for plain safetensors);
        a referenced tensor is checked in the file that holds it and named as it is here."""
        local, linked = self._by_file([*self.checksums, *self.links.refs])
        sums = self._digests(local)
        bad = [key for key in local if sums[key] != self.checksums[key]]
        for reader, pairs in linked:
            there = reader._digests(list(dict.fromkeys(target for target, _ in pairs)))
            bad.extend(key for target, key in pairs if there[target] != reader.checksums[target])
        return bad

    def _by_file(self, keys: list[str]) -> tuple[list[str], list[tuple[FileReader, list]]]:
        """``keys`` split into this file's checksummed entries and, per file of an earlier step
        that holds some of them, that file's reader with ``(key there, key here)`` pairs."""
        local: list[str] = []
        linked: dict[int, tuple[FileReader, list[tuple[str, str]]]] = {}
        for key in dict.fromkeys(keys):
            if key in self.links.refs:
                reader, target = self.links.target(key)
                linked.setdefault(id(reader), (reader, []))[1].append((target, key))
            elif key in self.checksums:
                local.append(key)
        return local, list(linked.values())

    def _digests(self, keys: list[str]) -> dict[str, str]:
        """The actual checksums of local entries ``keys``, hashed in parallel: from a mapping
        when the file is cached and nobody else can write it, else read with ``pread``."""
        start = self.header.data_start
        spans = [(k, start + self.entry(k).begin, self.entry(k).nbytes) for k in keys]
        local = self.remote is None
        if local and hashing.safe_to_map(self._fd) and hashing.looks_cached(self._fd, spans):
            sums = hashing.mapped_digests(self._fd, self.size, spans, self.path)
            if sums is not None:
                return sums
        return hashing.buffered_digests(self._preadinto, spans, self._piece)

    @property
    def _piece(self) -> int:
        """The read size of a verification through a buffer: a part for an object."""
        return knobs.REMOTE_PART_BYTES if self.remote is not None else knobs.READ_PIECE_BYTES

    # -- the whole object ------------------------------------------------------------------------
    def load(
        self,
        map_location: MapLocation = None,
        mmap: bool = False,
        verify: bool = True,
        placeholders: Callable[[str], bool] | None = None,
    ) -> Any:
        """Rebuild the saved object; tensors shared at save time come back shared.

        Tensors at paths where ``placeholders(path)`` is true come back as mapped CPU views of
        the file (checksums verified like the rest, but no private copy): for a caller that
        only needs their shapes now and reads them into place itself later
        (``load_checkpoint`` restoring a module).
        """
        cache: dict[tuple[str, str, bool], torch.Tensor] = {}

        def base(key: str, device: torch.device, lazy: bool) -> torch.Tensor:
            token = (key, str(device), lazy)
            if token not in cache:
                cpu_key = (key, "cpu", lazy)
                if cpu_key not in cache:
                    if lazy and verify:  # from disk through a small buffer, not the mapping
                        self.verify_entry(key)  # (hashing mapped pages makes them resident)
                    if lazy and self.remote is not None:  # shape only: read into place later
                        info = self.entry(key)
                        cache[cpu_key] = torch.empty(
                            info.shape, dtype=SAFETENSORS_TO_TORCH[info.dtype]
                        )
                        return cache[cpu_key]
                    cache[cpu_key] = (
                        self.map_entry(key, verify and not lazy)
                        if mmap or lazy
                        else self.read_entry(key, verify)
                    )
                if device.type != "cpu":
                    cache[token] = cache[cpu_key].to(device)
            return cache[token]

        def resolve(node: dict, path: str) -> torch.Tensor:
            # Plain references return the cached entry object itself, so aliases stay shared.
            lazy = placeholders is not None and placeholders(path)
            device = target_device(node.get("device", "cpu"), map_location, path, self.path)
            entry = base(node["key"], torch.device("cpu") if lazy else device, lazy)
            return restore_flags(node, materialize(node, entry, self.path, path))

        return decode(self.tree, resolve, self.path)

    def close(self) -> None:
        """Close the file (idempotent); tensors from :meth:`map_entry` stay valid."""
        self.links.close()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self._mapped = None

    def __enter__(self) -> FileReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _strict_json(text: str, where: str) -> Any:
    try:
        return json.loads(
            text, object_pairs_hook=header.no_duplicates, parse_constant=header.reject_constant
        )
    except RecursionError as exc:
        raise FormatError(f"{where}: nests too deeply") from exc
    except ValueError as exc:
        raise FormatError(f"{where}: invalid JSON ({exc})") from exc


def int_list(value: Any, what: str) -> list[int]:
    if not isinstance(value, list) or len(value) > knobs.MAX_RANK:
        raise ValueError(f"{what} must be a list of at most {knobs.MAX_RANK} ints")
    if not all(type(x) is int and 0 <= x < 2**62 for x in value):
        raise ValueError(f"{what} must hold non-negative ints")
    return value


def materialize(node: dict, entry: torch.Tensor, file: str, path: str) -> torch.Tensor:
    """Apply a node's dtype override and view to the entry tensor, bounds-checked."""
    try:
        tensor = entry
        if "dtype" in node:
            dtype = override_dtype(node["dtype"])  # never quantized or bits*
            itemsize = dtype.itemsize
            if entry.dtype != torch.uint8 or entry.numel() % itemsize:
                raise ValueError("dtype override needs a raw U8 entry of a fitting size")
            flat = entry.reshape(-1)
            if flat.storage_offset() % itemsize:
                flat = flat.clone()  # misaligned inside a memory map: copy once
            tensor = flat.view(dtype)
        if "view" in node:
            return _apply_view(node["view"], tensor.reshape(-1))
        if "shape" in node:
            return tensor.reshape(int_list(node["shape"], "shape"))
        return tensor
    except (ValueError, RuntimeError, TypeError, KeyError) as exc:
        raise FormatError(f"{file}: tensor at {path or '<root>'} is malformed ({exc})") from exc


def _apply_view(view: Any, flat: torch.Tensor) -> torch.Tensor:
    if not isinstance(view, dict):
        raise ValueError("view must be an object")
    shape = int_list(view.get("shape"), "view shape")
    stride = int_list(view.get("stride"), "view stride")
    offset = view.get("offset")
    if len(shape) != len(stride) or type(offset) is not int or offset < 0:
        raise ValueError("view needs shape and stride of equal rank and a non-negative offset")
    numel = math.prod(shape)
    if numel > knobs.MAX_VIEW_ELEMENTS:
        raise ValueError(
            f"view exposes {numel} elements, over the {knobs.MAX_VIEW_ELEMENTS} limit "
            "(TORCHKEEP_MAX_VIEW_ELEMENTS)"
        )
    if numel == 0:
        if offset > flat.numel():
            raise ValueError("view offset out of range")
    else:
        last = offset + sum((n - 1) * s for n, s in zip(shape, stride))
        if last >= flat.numel():
            raise ValueError(f"view reaches element {last} of a {flat.numel()}-element entry")
    return flat.as_strided(shape, stride, flat.storage_offset() + offset)


def restore_flags(node: dict, tensor: torch.Tensor) -> torch.Tensor:
    """Re-create ``nn.Parameter`` and ``requires_grad`` as saved."""
    requires_grad = node.get("requires_grad") is True
    if node.get("param") is True:
        return torch.nn.Parameter(tensor, requires_grad=requires_grad)
    if requires_grad and tensor.is_floating_point():
        return tensor.detach().requires_grad_(True)
    return tensor


def target_device(saved: Any, map_location: MapLocation, path: str, file: str) -> torch.device:
    """Where a tensor saved on ``saved`` goes, following torch.load's map_location rules."""
    if not isinstance(saved, str):
        raise FormatError(f"{file}: tensor at {path}: device must be a string")
    if map_location is None:
        target: Any = saved
    elif isinstance(map_location, (str, torch.device)):
        target = map_location
    elif isinstance(map_location, dict):
        target = map_location.get(saved, saved)
    else:
        raise TypeError("map_location must be None, a device, or a dict {saved: target}")
    try:
        device = torch.device(target)
    except RuntimeError as exc:
        raise FormatError(f"{file}: tensor at {path}: bad device {target!r}") from exc
    _require_available(device, path, file)
    return device


def _require_available(device: torch.device, path: str, file: str) -> None:
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TorchkeepError(
            f"{file}: tensor at {path or '<root>'} was saved on {device} but CUDA is not "
            "available here; pass map_location='cpu'"
        )
