"""Streamed uploads that never leave a partial object at the destination key.

* S3 (``s3://``, ``s3a://``): one multipart upload, parts sent concurrently from a bounded
  pool of part buffers, completed only after the last part was accepted (the object appears
  whole, at once); any error aborts it. A killed writer leaves an unfinished multipart upload,
  which is invisible to readers (an ``AbortIncompleteMultipartUpload`` lifecycle rule reclaims
  its space).
* Any other fsspec store: the bytes go to a temporary sibling key, then are moved onto the
  destination (``memory://`` and local mounts move atomically; a killed writer leaves only the
  temporary key, which is never a checkpoint name).

Both hash the bytes as they pass (xxh3-64) so the caller can record a checksum per object.
"""

from __future__ import annotations

import collections
import uuid
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from .. import knobs
from ..format import checksum
from . import retry

#: Names of temporary upload keys start with this (never a step or a checkpoint name).
TEMP_PREFIX = ".tk-upload-"
S3_MIN_PART = 5 * 1024 * 1024


def _pieces(chunks: Iterator[memoryview], limit: int) -> Iterator[memoryview]:
    """The chunks cut into pieces of at most ``limit`` bytes (views, no copy)."""
    for chunk in chunks:
        view = memoryview(chunk).cast("B")
        for lo in range(0, view.nbytes, limit):
            yield view[lo : lo + limit]


class S3Multipart:
    """Concurrent multipart upload of one object from in-order chunks (bounded memory)."""

    def __init__(self, fs: Any, key: str, url: str) -> None:
        self.fs, self.url = fs, url
        self.bucket, self.key, _ = fs.split_path(key)
        self.part_bytes = max(S3_MIN_PART, knobs.REMOTE_PART_BYTES)
        # The HTTP stack holds about two more copies of each part in flight (measured: peak extra
        # RSS of a 256 MB save grew by ~2.7 parts per added slot), so a third of the pool is ours.
        self.slots = max(2, knobs.REMOTE_BUFFER_BYTES // (3 * self.part_bytes))
        self.upload_id: str | None = None
        self.parts: list[dict] = []
        self.free: list[bytearray] = []
        self.pending: collections.deque[Future] = collections.deque()
        self.pool = ThreadPoolExecutor(min(self.slots, 16), thread_name_prefix="torchkeep-upload")

    def _s3(self, what: str, method: str, **kwargs: Any) -> Any:
        return retry.call(self.url, what, lambda: self.fs.call_s3(method, **kwargs))

    def run(self, chunks: Iterator[memoryview]) -> tuple[int, str]:
        """Upload every byte of ``chunks``; returns (size, xxh3). Aborts on any error."""
        hasher = checksum.new_hasher()
        size = 0
        try:
            started = self._s3(
                "start upload", "create_multipart_upload", Bucket=self.bucket, Key=self.key
            )
            self.upload_id = started["UploadId"]
            buf, used = self._buffer(), 0
            for piece in _pieces(chunks, self.part_bytes):
                hasher.update(piece)
                size += piece.nbytes
                while piece.nbytes:
                    take = min(piece.nbytes, self.part_bytes - used)
                    buf[used : used + take] = piece[:take]
                    used, piece = used + take, piece[take:]
                    if used == self.part_bytes:
                        self._send(buf, used)
                        buf, used = self._buffer(), 0
            if used or not self.parts and not self.pending:
                self._send(buf, used)
            self._drain(0)
            self._complete()
        except BaseException:
            self._abort()
            raise
        finally:
            self.pool.shutdown(wait=True)
        return size, hasher.hexdigest()

    def _buffer(self) -> bytearray:
        """A free part buffer; waits for an upload in flight when all slots are taken."""
        self._drain(self.slots - 1)
        return self.free.pop() if self.free else bytearray(self.part_bytes)

    def _send(self, buf: bytearray, used: int) -> None:
        number = len(self.parts) + len(self.pending) + 1
        body = buf if used == len(buf) else memoryview(buf)[:used].tobytes()
        self.pending.append(self.pool.submit(self._part, number, body, buf))

    def _part(self, number: int, body: Any, buf: bytearray) -> tuple[dict, bytearray]:
        out = self._s3(
            f"upload part {number}",
            "upload_part",
            Bucket=self.bucket,
            Key=self.key,
            UploadId=self.upload_id,
            PartNumber=number,
            Body=body,  # the part buffer itself (botocore takes a bytearray, not a view)
        )
        return {"PartNumber": number, "ETag": out["ETag"]}, buf

    def _drain(self, keep: int) -> None:
        while len(self.pending) > keep:
            part, buf = self.pending.popleft().result()
            self.parts.append(part)
            self.free.append(buf)

    def _complete(self) -> None:
        self.parts.sort(key=lambda p: p["PartNumber"])
        self._s3(
            "complete upload",
            "complete_multipart_upload",
            Bucket=self.bucket,
            Key=self.key,
            UploadId=self.upload_id,
            MultipartUpload={"Parts": self.parts},
        )

    def _abort(self) -> None:
        for future in self.pending:
            future.cancel()
        if self.upload_id is None:
            return
        try:
            self.fs.call_s3(
                "abort_multipart_upload", Bucket=self.bucket, Key=self.key, UploadId=self.upload_id
            )
        except Exception:  # best effort: an unfinished upload is invisible anyway
            pass


def upload_via_temp(fs: Any, key: str, url: str, chunks: Iterator[memoryview]) -> tuple[int, str]:
    """Any fsspec store: write a temporary sibling key, then move it onto ``key``."""
    parent, _, name = key.rpartition("/")
    temp_name = f"{TEMP_PREFIX}{uuid.uuid4().hex[:12]}-{name}"
    temp = f"{parent}/{temp_name}" if parent else temp_name
    hasher = checksum.new_hasher()
    size = 0
    try:
        with fs.open(temp, "wb") as handle:
            for piece in _pieces(chunks, max(1, knobs.REMOTE_PART_BYTES)):
                handle.write(piece)
                hasher.update(piece)
                size += piece.nbytes
        fs.mv(temp, key)
    except BaseException:
        try:
            fs.rm(temp)
        except Exception:  # best effort: a temporary key is never read as a checkpoint
            pass
        raise
    return size, hasher.hexdigest()


def is_s3(fs: Any) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol in ("s3", "s3a") and hasattr(fs, "call_s3")
