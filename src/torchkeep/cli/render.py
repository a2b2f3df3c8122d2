"""Output helpers shared by the commands: consoles, sizes, progress bars, JSON."""

from __future__ import annotations

import contextlib
import json
import math
import sys
from collections.abc import Iterator
from typing import Any

import click
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from ..format.dtypes import dtype_name
from ..readers.view import Ref
from .safe_text import TerminalGuard

_OPEN = {
    "trusted": click.option(
        "--trusted", is_flag=True, help="Allow full unpickling (runs code from the file)."
    ),
    "json": click.option("--json", "as_json", is_flag=True, help="Print one JSON object."),
}


def opt(name: str) -> Any:
    """A shared option decorator (``trusted`` or ``json``)."""
    return _OPEN[name]


#: Width of output that is not a terminal (a pipe, a file): wide enough that tables never cut
#: a key short, since a reader of piped output cannot widen the window.
PIPE_WIDTH = 10_000


def out() -> Console:
    """The console for results; control characters other than rich's colours never pass.

    Piped output gets a width no table reaches, so columns are never cut with an ellipsis.
    """
    width = None if sys.stdout.isatty() else PIPE_WIDTH
    return Console(file=TerminalGuard(sys.stdout), soft_wrap=True, highlight=False, width=width)


def key_table(*headers: str, title: str) -> Table:
    """A table whose first column (a key or name) wraps instead of being cut with an ellipsis,
    so two long keys that differ only at the end never print as the same row."""
    table = Table(title=title, title_justify="left")
    table.add_column(headers[0], overflow="fold")
    for header in headers[1:]:
        table.add_column(header)
    return table


def err() -> Console:
    return Console(file=TerminalGuard(sys.stderr), highlight=False)


def human(n: int) -> str:
    """Bytes in decimal units, as file sizes are usually shown: 1.5 MB."""
    value = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{n} B"


def print_json(obj: Any) -> None:
    """Strict JSON on stdout (infinities and NaN become the strings "inf" / "nan")."""
    click.echo(json.dumps(_finite(obj), indent=2, default=str, allow_nan=False))


def _finite(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return repr(obj)
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def tensor_row(ref: Ref) -> dict[str, Any]:
    return {
        "name": ref.name,
        "dtype": dtype_name(ref.dtype),
        "shape": list(ref.shape),
        "nbytes": ref.nbytes,
    }


@contextlib.contextmanager
def progress_bar(label: str, total: int) -> Iterator[Any]:
    """A byte progress bar on stderr (hidden when stderr is not a terminal)."""
    console = err()
    bar = Progress(
        TextColumn(label),
        BarColumn(),
        DownloadColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
        disable=not console.is_terminal,
    )
    with bar:
        task = bar.add_task(label, total=max(total, 1))
        yield lambda n: bar.advance(task, n)
