"""Which backend a path names: local paths and ``file://`` go to the local disk, any other
fsspec URL (``s3://``, ``gs://``, ``az://``, ``memory://``...) to :class:`FsspecBackend`.

fsspec is an optional dependency: it is imported only when a URL is used, and its absence is
reported as a :class:`TorchkeepError` naming the extra to install.
"""

from __future__ import annotations

import json
import os
import re
import threading
from typing import Any

from ..errors import TorchkeepError
from .backend import LOCAL, Backend
from .fsspec_backend import FsspecBackend

_URL_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")
_CACHE: dict[tuple[str, str], FsspecBackend] = {}
_CACHE_LOCK = threading.Lock()


def is_url(path: str | os.PathLike) -> bool:
    """True for ``scheme://...`` other than ``file://`` (which is a local path)."""
    if not isinstance(path, str):
        return False
    match = _URL_RE.match(path)
    return match is not None and match[1].lower() != "file"


def local_path(path: str | os.PathLike) -> str:
    """``path`` as a local path (``file://`` stripped), unchanged for other strings."""
    path = os.fspath(path)
    if isinstance(path, str) and path.lower().startswith("file://"):
        return path[len("file://") :]
    return path


def normalize(path: str | os.PathLike) -> str:
    """A URL unchanged (trailing slashes dropped), a local path made absolute."""
    path = os.fspath(path)
    if is_url(path):
        return path.rstrip("/") if not path.endswith("://") else path
    return os.path.abspath(local_path(path))


def require_fsspec(url: str) -> Any:
    """The fsspec module, or a TorchkeepError saying how to install it."""
    try:
        import fsspec  # optional dependency: imported only when a URL is used
    except ImportError:
        raise TorchkeepError(
            f"{url}: URLs need the optional fsspec support; run "
            "`pip install torchkeep[remote]` (fsspec, s3fs)"
        ) from None
    return fsspec


def backend_for(
    path: str | os.PathLike[str], storage_options: dict[str, Any] | None = None
) -> Backend:
    """The backend that stores ``path`` (one cached fsspec backend per scheme and options)."""
    path = os.fspath(path)
    if not is_url(path):
        return LOCAL
    return remote_backend_for(path, storage_options)


def remote_backend_for(url: str, storage_options: dict[str, Any] | None = None) -> FsspecBackend:
    """The object-store backend of ``url`` (which must be a URL): it also has the calls only
    object stores need (``kind``, ``size``, ``read_range``, ``remove``)."""
    path = url
    if not is_url(path):
        raise TorchkeepError(f"{path}: expected a URL (scheme://bucket/key)")
    protocol = _URL_RE.match(path)[1].lower()  # type: ignore[index]
    options = dict(storage_options or {})
    token = (protocol, json.dumps(options, sort_keys=True, default=repr))
    with _CACHE_LOCK:
        backend = _CACHE.get(token)
        if backend is None:
            backend = FsspecBackend(protocol, options, require_fsspec(path))
            _CACHE[token] = backend
    return backend
