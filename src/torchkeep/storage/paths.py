"""Open the files a directory names without leaving that directory.

A run directory on shared storage, an unpacked archive or a downloaded folder may have been
prepared by someone else. Whatever it holds, torchkeep must not read, write or truncate a file
outside it. The rules, applied wherever a path comes from a directory listing or a file's
content rather than from the caller:

- a file torchkeep expects to be regular is opened with ``O_NOFOLLOW`` and ``O_NONBLOCK`` and
  checked with ``fstat``: a symbolic link, a FIFO (which would block the open for ever), a
  device or a directory is refused with :class:`UnsafePathError` naming it;
- a name taken from a file (an index, a metadata record) must be one plain path component;
- a symbolic link inside a foreign folder is followed only when it resolves inside the folder,
  or, for a Hugging Face cache snapshot (``.../snapshots/<revision>/``), inside the cache
  entry's ``blobs/`` folder where the hub keeps the real files.
"""

from __future__ import annotations

import errno
import os
import stat

from ..errors import FormatError, UnsafePathError

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


def open_regular(path: str, flags: int = os.O_RDONLY, *, follow_symlinks: bool = False) -> int:
    """Open ``path`` as a regular file and return the descriptor; refuse anything else.

    ``follow_symlinks=True`` is for paths the caller typed (their own links are theirs to
    follow); paths found in a directory use the default.
    """
    flags |= _NONBLOCK | _CLOEXEC | (0 if follow_symlinks else _NOFOLLOW)
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as exc:
        if exc.errno == errno.ELOOP and not follow_symlinks:
            raise UnsafePathError(
                f"{path}: is a symbolic link where a regular file is expected; torchkeep does "
                "not follow links inside a checkpoint directory (replace it with the file)"
            ) from None
        raise
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise UnsafePathError(
                f"{path}: is a {_kind(mode)}, not a regular file; refusing to open it "
                "(a checkpoint file must be a plain file)"
            )
        if _NONBLOCK:
            os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_capped(path: str, limit: int, refusal: str) -> bytes:
    """The whole regular file ``path`` (a link or special file is refused), when it holds at
    most ``limit`` bytes; a larger one raises :class:`FormatError` ending in ``refusal``, after
    reading only ``limit + 1`` bytes of it. Errors opening it are the caller's to word."""
    with os.fdopen(open_regular(path), "rb") as handle:
        raw = handle.read(limit + 1)
    if len(raw) > limit:
        raise FormatError(f"{path}: larger than {limit} bytes; {refusal}")
    return raw


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "directory"),
        (stat.S_ISFIFO, "FIFO"),
        (stat.S_ISSOCK, "socket"),
        (stat.S_ISCHR, "character device"),
        (stat.S_ISBLK, "block device"),
        (stat.S_ISLNK, "symbolic link"),
    ):
        if test(mode):
            return name
    return "special file"


def plain_name(name: str, where: str) -> str:
    """``name`` if it is one path component (no separator, not ``.``/``..``, no NUL)."""
    if (
        not isinstance(name, str)
        or name in ("", ".", "..")
        or "/" in name
        or "\\" in name
        or "\x00" in name
    ):
        raise UnsafePathError(
            f"{where}: names {name!r}, which points outside the folder (not a plain file "
            "name); the folder is damaged or hostile"
        )
    return name


def inside(folder: str, name: str, where: str) -> str:
    """The path of entry ``name`` of ``folder``, with any link resolved and checked to stay.

    Returns the path to open (the link's target when ``name`` is a permitted link); raises
    :class:`UnsafePathError` for a name or link that leads outside.
    """
    path = os.path.join(folder, plain_name(name, where))
    if not os.path.islink(path):
        return path
    real = os.path.realpath(path)
    for root in _roots(folder):
        if os.path.commonpath([real, root]) == root:
            return real
    raise UnsafePathError(
        f"{path}: is a symbolic link to {real}, outside the folder; torchkeep only follows "
        "links that stay inside it (copy the file into the folder instead)"
    )


def _roots(folder: str) -> list[str]:
    real = os.path.realpath(folder)
    roots = [real]
    parent = os.path.dirname(real)
    if os.path.basename(parent) == "snapshots":  # huggingface_hub cache: snapshots/<rev>/
        roots.append(os.path.join(os.path.dirname(parent), "blobs"))
    return roots
