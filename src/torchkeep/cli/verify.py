"""``torchkeep verify``: check every checksum (or structure), name every corrupt tensor."""

from __future__ import annotations

import sys

import click

from ..errors import TorchkeepError
from .errors import EXIT_FAILED, one_line
from .render import opt, out, print_json, progress_bar
from .sources import open_view


def verify_path(path: str, trusted: bool) -> dict:
    """The ``--json`` object of ``verify``; ``ok`` is the verdict."""
    try:
        view = open_view(path, trusted=trusted)
    except TorchkeepError as exc:
        return {
            "path": path,
            "format": None,
            "ok": False,
            "tensors": 0,
            "checksums": None,
            "problems": [one_line(exc).removeprefix("error: ")],
        }
    with view:
        with progress_bar("verifying", view.total_bytes) as advance:
            problems = view.check(advance)
        steps = [s.step for s in getattr(view, "steps", [])]
        result = {
            "path": path,
            "format": view.format,
            "ok": not problems,
            "tensors": len(view.refs),
            "checksums": view.checksum_algorithm,
            "problems": problems,
            "notes": list(view.notes),
        }
        if steps:
            result["steps"] = steps
    return result


@click.command("verify")
@click.argument("path", type=click.Path())
@opt("json")
@opt("trusted")
def verify_cmd(path: str, as_json: bool, trusted: bool) -> None:
    """Verify every checksum of PATH (a file, folder or run directory). Exit 1 on any failure.

    Formats without checksums (safetensors, torch.save, DCP) are read in full and checked for
    structural validity.

    \b
    Example:
      torchkeep verify checkpoints/          # every step of a run directory
      torchkeep verify model.tk --json
    """
    result = verify_path(path, trusted)
    if as_json:
        print_json(result)
    else:
        console = out()
        for problem in result["problems"]:
            console.print(f"[red]FAIL[/red] {problem}")
        for note in result.get("notes", []):
            console.print(f"note: {note}")
        what = f"checksums ({result['checksums']})" if result["checksums"] else "structure"
        if result["ok"]:
            console.print(f"OK {path}: {result['tensors']} tensors, {what} verified")
        else:
            console.print(f"CORRUPT {path}: {len(result['problems'])} problem(s)")
    if not result["ok"]:
        sys.exit(EXIT_FAILED)
