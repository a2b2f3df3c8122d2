"""Turn expected failures into one line on stderr and a documented exit code.

Exit codes: 0 success; 1 check failed (``diff`` found differences, ``verify`` found corruption,
``scan`` found an unsafe pickle); 2 usage error; 3 the checkpoint could not be read (missing,
unknown format, malformed, corrupt); 4 a pickle was refused (needs ``--trusted``).
Set ``TORCHKEEP_DEBUG=1`` to see the Python traceback instead.
"""

from __future__ import annotations

import os
from typing import Any

import click

from ..errors import TorchkeepError, UnsafeFileError
from .safe_text import one_line_safe

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_ERROR, EXIT_REFUSED = 0, 1, 2, 3, 4


def debug() -> bool:
    return os.environ.get("TORCHKEEP_DEBUG", "") not in ("", "0")


def exit_code(exc: BaseException) -> int:
    return EXIT_REFUSED if isinstance(exc, UnsafeFileError) else EXIT_ERROR


def one_line(exc: BaseException) -> str:
    """The message of ``exc`` on one line, prefixed with what kind of failure it is."""
    text = one_line_safe(str(exc)) or type(exc).__name__
    if isinstance(exc, TorchkeepError):
        return f"error: {text}"
    if isinstance(exc, OSError):
        return f"error: {text} (check the path and its permissions)"
    return f"error: {type(exc).__name__}: {text}"


class GuardedGroup(click.Group):
    """A click group whose commands fail with one line instead of a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (TorchkeepError, OSError, MemoryError) as exc:
            if debug():
                raise
            click.echo(one_line(exc), err=True)
            ctx.exit(exit_code(exc))
