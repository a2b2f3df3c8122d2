"""Object-store failures: classified into :class:`StorageError` subclasses, transient ones
retried with bounded exponential backoff.

fsspec implementations raise a mix of ``OSError`` subclasses (s3fs maps S3 error codes to
``FileNotFoundError``/``PermissionError``) and their HTTP stack's own exceptions (botocore,
aiohttp). A missing object stays ``FileNotFoundError`` (callers treat it as "not there"); a
missing bucket, refused credentials and failures that outlast the retries become one-line
errors naming the URL and what to do.
"""

from __future__ import annotations

import errno
import time
from collections.abc import Callable
from typing import TypeVar

from .. import knobs
from ..errors import (
    BucketNotFoundError,
    StorageAuthError,
    StorageUnavailableError,
    TorchkeepError,
)

T = TypeVar("T")

_AUTH_WORDS = (
    "accessdenied",
    "access denied",
    "invalidaccesskeyid",
    "expiredtoken",
    "token has expired",
    "signaturedoesnotmatch",
    "unable to locate credentials",
    "nocredentials",
    "forbidden",
)
_BUCKET_WORDS = ("nosuchbucket", "bucket does not exist", "specified bucket does not exist")
_HTTP_MODULES = ("botocore", "aiobotocore", "aiohttp", "urllib3", "requests", "s3fs", "gcsfs")


def _text(exc: BaseException) -> str:
    return f"{type(exc).__name__} {exc}".lower()


def is_auth(exc: BaseException) -> bool:
    return isinstance(exc, PermissionError) or any(w in _text(exc) for w in _AUTH_WORDS)


def is_missing_bucket(exc: BaseException) -> bool:
    return any(w in _text(exc) for w in _BUCKET_WORDS)


def is_transient(exc: BaseException) -> bool:
    """Network failures, timeouts, throttling and server errors: worth another try."""
    if isinstance(exc, TorchkeepError) or is_auth(exc) or is_missing_bucket(exc):
        return False
    if isinstance(exc, FileNotFoundError | IsADirectoryError | NotADirectoryError):
        return False
    if isinstance(exc, ConnectionError | TimeoutError):
        return True
    if isinstance(exc, OSError):
        return exc.errno not in (errno.EINVAL, errno.ENOENT, errno.EEXIST, errno.ENOSPC)
    return type(exc).__module__.split(".")[0] in _HTTP_MODULES


def translate(exc: BaseException, url: str, what: str) -> BaseException:
    """The torchkeep error for a failed store call (the original when nothing fits)."""
    if isinstance(exc, TorchkeepError):
        return exc
    detail = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
    if is_missing_bucket(exc):
        return BucketNotFoundError(
            f"{url}: {what} failed: the bucket does not exist ({detail}); create it or fix the URL"
        )
    if is_auth(exc):
        return StorageAuthError(
            f"{url}: {what} failed: the store refused the credentials ({detail}); "
            "refresh or fix them (environment, profile, or storage_options=)"
        )
    if is_transient(exc):
        return StorageUnavailableError(
            f"{url}: {what} failed after {knobs.REMOTE_RETRIES} retries ({detail}); "
            "check the network and the endpoint (AWS_ENDPOINT_URL, storage_options=) and retry"
        )
    return exc


def backoff(attempt: int) -> float:
    """Seconds to wait before retry number ``attempt`` (0-based): doubling, capped at 8 s."""
    return min(8.0, knobs.REMOTE_BACKOFF_MS / 1000.0 * (2**attempt))


def call(url: str, what: str, fn: Callable[[], T]) -> T:
    """Run ``fn``; retry transient failures; raise translated errors."""
    attempt = 0
    while True:
        try:
            return fn()
        except Exception as exc:
            if is_transient(exc) and attempt < knobs.REMOTE_RETRIES:
                time.sleep(backoff(attempt))
                attempt += 1
                continue
            error = translate(exc, url, what)
            if error is exc:
                raise
            raise error from exc
