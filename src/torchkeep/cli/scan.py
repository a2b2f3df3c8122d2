"""``torchkeep scan``: which globals a pickle-based checkpoint imports, found without running it."""

from __future__ import annotations

import os
import sys

import click
from rich.table import Table

from ..errors import FormatError
from ..readers import detect
from ..readers.dcp import _ALLOWED as DCP_ALLOWED
from ..readers.dcp import METADATA_NAME, read_blob, read_metadata, scan_blob
from ..readers.pickle_scan import ScanResult, scan_file, scan_stream
from ..readers.torch_file import allowed_globals
from ..transfer.reader import FileReader
from .errors import EXIT_FAILED
from .render import opt, out, print_json
from .safe_text import sanitize


def _dcp_allowed(ref: str) -> bool:
    module, _, name = ref.rpartition(".")
    return (module, name) in DCP_ALLOWED or (
        module == "torch" and name.startswith(("float", "bfloat", "int", "uint", "bool", "complex"))
    )


def scan_one(path: str) -> dict:
    """Globals of one file and whether each is allowed for its loader."""
    if os.path.basename(path) == METADATA_NAME:
        result = ScanResult()
        with open(path, "rb") as handle:
            scan_stream(handle.read(), result, METADATA_NAME)
        allowed = [_dcp_allowed(g) for g in result.globals]
        kind = "dcp-metadata"
    else:
        kind = detect.sniff_file(path)
        if kind == detect.SAFETENSORS:
            FileReader(path).close()  # a malformed header is refused, not called "safe"
            return {"file": path, "format": kind, "pickle": False, "globals": []}
        result = scan_file(path)
        known = allowed_globals()
        allowed = [g in known for g in result.globals]
    rows = [{"name": g, "allowed": ok} for g, ok in zip(result.globals, allowed)]
    return {"file": path, "format": kind, "pickle": True, "globals": rows}


def _files(path: str) -> list[str]:
    if not os.path.isdir(path):
        return [path]
    found = []
    for name in sorted(os.listdir(path)):
        full = os.path.join(path, name)
        if os.path.isfile(full) and not name.endswith((".json", ".txt", ".md")):
            found.append(full)
    return found


def _verdict(path: str, files: list[dict]) -> dict:
    unsafe = sorted({g["name"] for f in files for g in f["globals"] if not g["allowed"]})
    verdict = "unsafe" if unsafe else "safe"
    return {"path": path, "verdict": verdict, "unsafe": unsafe, "files": files}


def _scan_dcp(path: str) -> dict:
    """DCP: the metadata pickle, then every item blob it locates (each a torch.save zip)."""
    files = [scan_one(os.path.join(path, METADATA_NAME))]
    if any(not g["allowed"] for g in files[0]["globals"]):
        return _verdict(path, files)  # the item table itself is untrusted: stop here
    meta = read_metadata(path)
    known = allowed_globals()
    for index, info in meta.storage_data.items():
        result = scan_blob(read_blob(path, info))
        rows = [{"name": g, "allowed": g in known} for g in result.globals]
        where = f"{os.path.join(path, info.relative_path)}@{info.offset} ({index.fqn})"
        files.append({"file": where, "format": "dcp-item", "pickle": True, "globals": rows})
    return _verdict(path, files)


def scan_path(path: str) -> dict:
    """The ``--json`` object of ``scan``; ``verdict`` is ``safe`` or ``unsafe``."""
    files = []
    if detect.sniff(path) == detect.DCP:
        return _scan_dcp(path)
    for file in _files(path):
        try:
            files.append(scan_one(file))
        except FormatError:
            if file == path:
                raise
    unsafe = sorted({g["name"] for f in files for g in f["globals"] if not g["allowed"]})
    return {
        "path": path,
        "verdict": "unsafe" if unsafe else "safe",
        "unsafe": unsafe,
        "files": files,
    }


@click.command("scan")
@click.argument("path", type=click.Path())
@opt("json")
def scan_cmd(path: str, as_json: bool) -> None:
    """List the globals the pickles in PATH would import; exit 1 when any is unsafe.

    Nothing from the file is executed: the pickle opcodes are only parsed. "safe" means
    torch's weights-only loader accepts every global (torchkeep loads it without --trusted).

    \b
    Example:
      torchkeep scan downloaded_model.bin
    """
    result = scan_path(path)
    if as_json:
        print_json(result)
    else:
        shown = sanitize(result)
        console = out()
        for entry in shown["files"]:
            if not entry["pickle"]:
                console.print(f"{entry['file']}: {entry['format']}, no pickle")
                continue
            table = Table(
                "global",
                "status",
                title=f"{entry['file']} ({entry['format']})",
                title_justify="left",
            )
            for row in entry["globals"]:
                table.add_row(row["name"], "allowed" if row["allowed"] else "[red]UNSAFE[/red]")
            console.print(table)
        if result["verdict"] == "safe":
            console.print("verdict: [green]safe[/green] for weights-only loading")
        else:
            console.print(
                f"verdict: [red]unsafe[/red]: {', '.join(shown['unsafe'])}; load it "
                "only with --trusted if you trust its source"
            )
    if result["verdict"] != "safe":
        sys.exit(EXIT_FAILED)
