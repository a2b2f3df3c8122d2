"""``torchkeep verify``: check every checksum (or structure), name every corrupt tensor."""

from __future__ import annotations

import sys

import click

from ..errors import TorchkeepError, UnsafeFileError
from ..readers import detect
from .errors import EXIT_FAILED, one_line
from .render import opt, out, print_json, progress_bar
from .safe_text import markup_safe, sanitize
from .sources import is_sharded, open_view


def verify_path(path: str, trusted: bool) -> dict:
    """The ``--json`` object of ``verify``; ``ok`` is the verdict.

    A path that is missing or is no checkpoint at all raises (the CLI's "unreadable", exit 3),
    and so does a pickle refused without ``--trusted`` (exit 4); a file that is recognized but
    damaged is a verdict: ``ok`` false with its problems.
    """
    if not is_sharded(path):
        detect.sniff(path)  # CheckpointNotFoundError / FormatError: unreadable, not corrupt
    try:
        view = open_view(path, trusted=trusted)
    except UnsafeFileError:
        raise
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

    Exit 3 when PATH is missing or not a checkpoint (unreadable), 4 when it is a pickle that
    needs --trusted.

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
        shown, path = sanitize(result), markup_safe(path)
        console = out()
        for problem in shown["problems"]:
            console.print(f"[red]FAIL[/red] {problem}")
        for note in shown.get("notes", []):
            console.print(f"note: {note}")
        what = f"checksums ({result['checksums']})" if result["checksums"] else "structure"
        if result["ok"]:
            console.print(f"OK {path}: {result['tensors']} tensors, {what} verified")
        else:
            console.print(f"CORRUPT {path}: {len(result['problems'])} problem(s)")
    if not result["ok"]:
        sys.exit(EXIT_FAILED)
