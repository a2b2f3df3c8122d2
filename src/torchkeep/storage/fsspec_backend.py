"""Object stores and other fsspec filesystems as a :class:`~torchkeep.storage.backend.Backend`.

Object stores have no atomic rename, so a unit (a manager step) is committed by a marker
(:data:`MARKER`): the step's objects are uploaded under its prefix first, each confirmed
complete (size read back from the store), and only then the marker is written, listing every
object with its size and xxh3 checksum. Readers trust a step only when its marker parses and
every object it lists is present with that size; a prefix without one is an incomplete save,
listed as a leftover and swept by retention. Deletion removes the marker first, so a
half-deleted step is never seen as committed.

fsspec is imported by :mod:`torchkeep.storage.urls` only when a URL is used, and handed in.
"""

from __future__ import annotations

import builtins  # `list` is also a method name of the backend class below
import json
import posixpath
import threading
from collections.abc import Sequence
from typing import Any

from ..errors import CheckpointNotFoundError, StorageError
from . import retry
from .backend import BytesPayload, Fill, Listed, Payload
from .upload import S3Multipart, is_s3, upload_via_temp

#: The commit marker of a step: written last, deleted first.
MARKER = "COMMITTED.json"
MARKER_MAX_BYTES = 1 << 20
MARKER_FORMAT = "torchkeep-commit-1"


class FsspecBackend:
    """One fsspec filesystem (``s3://``, ``gs://``, ``memory://``...), paths given as URLs."""

    def __init__(self, protocol: str, options: dict, fsspec: Any) -> None:
        self.protocol = protocol
        self.fs = fsspec.filesystem(protocol, **options)
        self._written: dict[str, list[dict]] = {}  # staged prefix -> objects uploaded there
        self._lock = threading.Lock()

    # -- names ---------------------------------------------------------------------------------
    def key(self, url: str) -> str:
        """The store's own path of ``url`` (scheme stripped)."""
        return self.fs._strip_protocol(url)

    def _call(self, url: str, what: str, fn: Any) -> Any:
        return retry.call(url, what, fn)

    # -- writing -------------------------------------------------------------------------------
    def write_file(self, path: str, size: int, fill: Fill) -> None:
        raise StorageError(
            f"{path}: object stores take a file's bytes in order (write_payload), not through "
            "a file descriptor; this is a bug in the caller"
        )

    def write_payload(self, path: str, payload: Payload) -> None:
        """Upload ``payload`` to ``path``; the object appears whole or not at all."""
        key = self.key(path)

        def upload() -> tuple[int, str]:
            if is_s3(self.fs):
                return S3Multipart(self.fs, key, path).run(payload.chunks())
            return upload_via_temp(self.fs, key, path, payload.chunks())

        size, digest = self._call(path, "upload", upload)
        if size != payload.size:
            raise StorageError(f"{path}: uploaded {size} bytes, expected {payload.size}")
        parent, name = posixpath.split(path)
        with self._lock:
            if parent in self._written:
                self._written[parent].append({"name": name, "size": size, "xxh3": digest})

    # -- reading -------------------------------------------------------------------------------
    def read_range(self, path: str, offset: int, size: int) -> bytes:
        """``size`` bytes of ``path`` from ``offset`` (exactly; short objects raise)."""
        if size <= 0:
            return b""
        key = self.key(path)
        data = self._call(
            path,
            "read",
            lambda: self.fs.cat_file(key, start=offset, end=offset + size),
        )
        if len(data) != size:
            raise StorageError(
                f"{path}: object ends before byte {offset + size} (got {len(data)} of {size} "
                f"bytes at {offset}); the object is truncated"
            )
        return data

    def read_into(self, path: str, ranges: Sequence[tuple[int, memoryview]]) -> None:
        for offset, buffer in ranges:
            view = memoryview(buffer).cast("B")
            view[:] = self.read_range(path, offset, view.nbytes)

    def size(self, path: str) -> int:
        """Bytes of the object at ``path``; CheckpointNotFoundError when there is none."""
        key = self.key(path)
        self.fs.invalidate_cache(key)
        try:
            info = self._call(path, "stat", lambda: self.fs.info(key))
        except FileNotFoundError as exc:
            if isinstance(exc, CheckpointNotFoundError):
                raise
            raise CheckpointNotFoundError(f"{path}: no such object") from None
        if info.get("type") != "file":
            raise IsADirectoryError(f"{path}: is a prefix (directory), not an object")
        return int(info.get("size") or 0)

    def kind(self, path: str) -> str | None:
        """``"file"``, ``"dir"`` or None when nothing is stored at ``path``."""
        key = self.key(path)
        self.fs.invalidate_cache(key)
        try:
            info = self._call(path, "stat", lambda: self.fs.info(key))
        except FileNotFoundError:
            return None
        return "file" if info.get("type") == "file" else "dir"

    def list(self, directory: str) -> list[Listed]:
        key = self.key(directory).rstrip("/")
        self.fs.invalidate_cache(key)
        found = self._call(directory, "list", lambda: self.fs.ls(key, detail=True))
        out = []
        for info in found:
            name = str(info.get("name", "")).rstrip("/")
            if name == key or not name:
                continue
            kind = "file" if info.get("type") == "file" else "dir"
            out.append(
                Listed(posixpath.basename(name), kind, int(info.get("size") or 0), _mtime(info))
            )
        return sorted(out, key=lambda e: e.name)

    # -- commit ---------------------------------------------------------------------------------
    def stage(self, target: str) -> str:
        """Objects go straight under the step's prefix; the marker is what commits them."""
        with self._lock:
            self._written[target] = []
        return target

    def commit(self, staged: str, target: str) -> None:
        with self._lock:
            written = self._written.pop(staged, [])
        self.commit_files(target, written)

    def commit_files(self, target: str, written: builtins.list[dict[str, Any]]) -> None:
        """Write the marker listing ``written`` ({name, size}) once the store holds each whole
        (also for objects other processes uploaded: the ranks of a sharded save)."""
        staged = target
        with self._lock:
            self._written.pop(target, None)
        for record in written:  # confirmed complete: the store reports each object whole
            url = posixpath.join(staged, record["name"])
            if self.size(url) != record["size"]:
                raise StorageError(f"{url}: the store holds a different size than was uploaded")
        marker = {"format": MARKER_FORMAT, "files": written}
        data = json.dumps(marker, indent=1).encode()
        self.write_payload(posixpath.join(target, MARKER), BytesPayload(data))

    def abandon(self, staged: str) -> None:
        with self._lock:
            self._written.pop(staged, None)
        try:
            self.remove(staged)
        except Exception:  # best effort: an unmarked prefix is swept later
            pass

    def committed(self, path: str, entries: builtins.list[Listed]) -> bool:
        """A valid marker lists objects that are all present with their recorded sizes."""
        files = self.marker_files(path, entries)
        if files is None:
            return False
        sizes = {e.name: e.size for e in entries if e.kind == "file"}
        return all(sizes.get(f["name"]) == f["size"] for f in files)

    def marker_files(self, path: str, entries: builtins.list[Listed]) -> builtins.list[dict] | None:
        """The object list of the marker at ``path`` (None when absent or invalid)."""
        marker = next((e for e in entries if e.name == MARKER and e.kind == "file"), None)
        if marker is None or marker.size > MARKER_MAX_BYTES:
            return None
        try:
            obj = json.loads(self.read_range(posixpath.join(path, MARKER), 0, marker.size))
        except (OSError, ValueError):
            return None
        files = obj.get("files") if isinstance(obj, dict) else None
        if obj.get("format") != MARKER_FORMAT or not isinstance(files, list):
            return None
        ok = all(
            isinstance(f, dict)
            and isinstance(f.get("name"), str)
            and "/" not in f["name"]
            and type(f.get("size")) is int
            for f in files
        )
        return files if ok else None

    # -- deleting ------------------------------------------------------------------------------
    def delete(self, path: str) -> None:
        """Marker first (the step stops being committed), then every object of the prefix."""
        marker = self.key(posixpath.join(path, MARKER))
        try:
            self._call(path, "delete marker", lambda: self.fs.rm_file(marker))
        except FileNotFoundError:
            pass
        self.remove(path)

    def remove(self, path: str) -> None:
        """Delete every object under ``path`` (no marker logic)."""
        key = self.key(path)
        self.fs.invalidate_cache(key)
        try:
            self._call(path, "delete", lambda: self.fs.rm(key, recursive=True))
        except FileNotFoundError:
            pass

    def write_bytes(self, path: str, data: bytes) -> None:
        """A small object written whole (a single PUT is atomic on object stores)."""
        self.write_payload(path, BytesPayload(data))


def _mtime(info: dict[str, Any]) -> float:
    for field in ("LastModified", "mtime", "created", "last_modified", "updated"):
        value = info.get(field)
        if value is not None and hasattr(value, "timestamp"):
            return float(value.timestamp())
        if isinstance(value, (int, float)):
            return float(value)
    return 0.0
