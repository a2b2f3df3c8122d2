"""``torchkeep scan``: which globals a pickle-based checkpoint imports, found without running it."""

from __future__ import annotations

import os
import sys
from typing import IO, cast

import click
from rich.table import Table

from .. import knobs
from ..errors import FormatError
from ..readers import detect
from ..readers.containers import ScanResult, Window, scan_payload, scan_pickles
from ..readers.dcp import _ALLOWED as DCP_ALLOWED
from ..readers.dcp import METADATA_NAME, read_metadata
from ..readers.export_archive import is_export_archive, scan_export_archive
from ..readers.pickle_scan import scan_file
from ..readers.torch_file import allowed_globals
from ..storage.urls import is_url
from ..transfer.reader import FileReader
from .errors import EXIT_FAILED
from .render import opt, out, print_json
from .safe_text import markup_safe

_SKIP = (".json", ".txt", ".md", ".py", ".yaml", ".yml")


def _dcp_allowed(ref: str) -> bool:
    module, _, name = ref.rpartition(".")
    return (module, name) in DCP_ALLOWED or (
        module == "torch" and name.startswith(("float", "bfloat", "int", "uint", "bool", "complex"))
    )


def _entry(path: str, kind: str, result: ScanResult, allowed) -> dict:
    ok = allowed if callable(allowed) else allowed.__contains__
    rows = [{"name": g, "allowed": bool(ok(g))} for g in result.globals]
    return {"file": path, "format": kind, "pickle": True, "globals": rows,
            "problems": list(result.problems)}  # fmt: skip


def scan_one(path: str) -> dict:
    """Globals of one file, whether each is allowed for its loader, and what was unresolved."""
    if os.path.basename(path) == METADATA_NAME:
        result = ScanResult()
        with open(path, "rb") as handle:
            scan_pickles(handle, result, METADATA_NAME)
        return _entry(path, "dcp-metadata", result, _dcp_allowed)
    kind = detect.sniff_file(path)
    if kind == detect.SAFETENSORS:
        FileReader(path).close()  # a malformed header is refused, not called "safe"
        return {"file": path, "format": kind, "pickle": False, "globals": [], "problems": []}
    if kind == detect.TORCH_ZIP and is_export_archive(path):
        return _entry(path, "torch-export", scan_export_archive(path), allowed_globals())
    return _entry(path, kind, scan_file(path), allowed_globals())


def _dcp_item(folder: str, index, info, known: set[str]) -> dict:
    """One DCP item, scanned in place inside its ``.distcp`` file (location validated first)."""
    rel, offset, length = info.relative_path, info.offset, info.length
    if not isinstance(rel, str) or os.path.basename(rel) != rel or rel in ("", ".", ".."):
        raise FormatError(f"{folder}: DCP storage path {rel!r} leaves the directory")
    path = os.path.join(folder, rel)
    where = f"{path}@{offset} ({index.fqn})"
    result = ScanResult()
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        if not (isinstance(offset, int) and isinstance(length, int)) or not (
            offset >= 0 and length >= 0 and offset + length <= size
        ):
            raise FormatError(f"{path}: DCP item at {offset}+{length} is out of range")
        # Window is a raw binary stream (read/seek/tell): an IO[bytes] in all but name.
        scan_payload(cast(IO[bytes], Window(handle, offset, length)), result, where)
    return _entry(where, "dcp-item", result, known)


def _scan_dcp(path: str) -> list[dict]:
    """DCP: the metadata pickle, then every item it locates (each a torch.save blob)."""
    files = [scan_one(os.path.join(path, METADATA_NAME))]
    if _bad(files[0]):
        return files  # the item table itself is untrusted: stop here
    meta = read_metadata(path)
    known = allowed_globals()
    items = list(meta.storage_data.items())
    if len(items) > knobs.SCAN_MAX_MEMBERS:
        raise FormatError(f"{path}: DCP metadata lists {len(items)} items, over the scan cap")
    files.extend(_dcp_item(path, index, info, known) for index, info in items)
    return files


def _bad(entry: dict) -> list[str]:
    refused = [g["name"] for g in entry["globals"] if not g["allowed"]]
    return refused + [f"unresolved: {p}" for p in entry.get("problems", [])]


def _walk(path: str) -> list[dict]:
    """Every checkpoint file under ``path`` (symlinks not followed); DCP folders as a whole."""
    if not os.path.isdir(path):
        return [scan_one(path)]
    names = os.listdir(path)
    if METADATA_NAME in names and any(n.endswith(".distcp") for n in names):
        return _scan_dcp(path)
    found: list[dict] = []
    for name in sorted(os.listdir(path)):
        full = os.path.join(path, name)
        if os.path.islink(full) or name.endswith(_SKIP):
            continue
        if os.path.isdir(full):
            found.extend(_walk(full))
        elif os.path.isfile(full):
            try:
                found.append(scan_one(full))
            except FormatError:
                continue  # not a checkpoint file (a README, a tokenizer, ...)
    return found


def scan_path(path: str) -> dict:
    """The ``--json`` object of ``scan``; ``verdict`` is ``safe`` or ``unsafe``."""
    if is_url(path):  # object stores hold torchkeep/safetensors files only: no pickle
        kind = detect.sniff(path)
        if kind == detect.SAFETENSORS:
            FileReader(path).close()  # a malformed header is refused, not called "safe"
        files = [{"file": path, "format": kind, "pickle": False, "globals": [], "problems": []}]
    else:
        files = _walk(path)
    unsafe = list(dict.fromkeys(item for f in files for item in _bad(f)))
    return {"path": path, "verdict": "unsafe" if unsafe else "safe", "unsafe": unsafe,
            "files": files}  # fmt: skip


def _clean(text: str) -> str:
    """File-derived text made inert for the terminal: no control characters, no markup."""
    return markup_safe(str(text))


def _print(result: dict) -> None:
    console = out()
    for entry in result["files"]:
        if not entry["pickle"]:
            console.print(f"{_clean(entry['file'])}: {entry['format']}, no pickle")
            continue
        table = Table("global", "status", title=f"{_clean(entry['file'])} ({entry['format']})",
                      title_justify="left")  # fmt: skip
        for row in entry["globals"]:
            table.add_row(_clean(row["name"]), "allowed" if row["allowed"] else "[red]UNSAFE[/red]")
        console.print(table)
        for problem in entry["problems"]:
            console.print(f"  [red]unresolved[/red]: {_clean(problem)}")
    if result["verdict"] == "safe":
        console.print("verdict: [green]safe[/green] for weights-only loading")
    else:
        listing = ", ".join(_clean(u) for u in result["unsafe"][:12])
        more = f" and {len(result['unsafe']) - 12} more" if len(result["unsafe"]) > 12 else ""
        console.print(f"verdict: [red]unsafe[/red]: {listing}{more}; load it only with "
                      "--trusted if you trust its source")  # fmt: skip


@click.command("scan")
@click.argument("path", type=click.Path())
@opt("json")
def scan_cmd(path: str, as_json: bool) -> None:
    """List the globals the pickles in PATH would import; exit 1 when any is unsafe.

    Nothing from the file is executed: each pickle is replayed on a model of the unpickler
    (stack, memo, every opcode of protocols 0-5), inside every container (zips, nested zips,
    tar, torch.export archives, DCP items). "safe" means every global is on torch's
    weights-only allow-list and nothing was left unresolved; anything the scan cannot resolve
    counts as unsafe.

    \b
    Example:
      torchkeep scan downloaded_model.bin
    """
    result = scan_path(path)
    if as_json:
        print_json(result)
    else:
        _print(result)
    if result["verdict"] != "safe":
        sys.exit(EXIT_FAILED)
