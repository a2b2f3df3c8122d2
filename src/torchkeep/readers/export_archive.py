"""What ``torch.export.load`` would execute from a ``.pt2`` archive, found without running it.

torch 2.13's loader reads more than JSON and raw weights: it ``torch.load``s sample inputs
(weights-only, then falling back to the full unpickler) and pickled weights and constants
(``weights_only=False``), ``pickle.loads`` opaque constants, unpickles TorchScript objects,
loads AOTInductor shared libraries found under ``data/aotinductor/``, parses every symbolic
``expr_str`` of the graph with ``sympy.sympify`` (an ``eval``), resolves node targets by
attribute lookups from ``torch``, and ``exec``s the program's ``guards_code`` when
``.module()`` is called. :func:`scan_export_archive` checks all of it: every member that is not
raw tensor bytes described by the archive's own configs, JSON or a version record is scanned as
``torch.load`` input, strictly; compiled code and TorchScript objects are unresolvable; symbolic
expressions must match a small arithmetic grammar; node targets must be operators; guards code
must be empty. Anything else is recorded as a problem.
"""

from __future__ import annotations

import json
import re
import zipfile
from typing import Any

from .. import knobs
from .containers import ScanResult, _check_members, _member_stream, scan_payload
from .pickle_vm import ScanLimitError

_TEXT = {"archive_format", "archive_version", "byteorder", ".data/version",
         ".data/serialization_id"}  # fmt: skip
_CODE_DIRS = ("data/aotinductor/", "data/mtia/", "data/executorch/")
_CONFIGS = {"data/weights/": "weights", "data/constants/": "constants"}
_EXPR = re.compile(r"[A-Za-z0-9_+\-*/%(),.<>=!&|~ ]*")
_NAME = re.compile(r"[A-Za-z_]\w*")
_SYMBOL = re.compile(r"(?:[a-z]{1,4}\d+|[A-Z][A-Za-z]*\d*|oo|zoo|nan|True|False|E|I|pi)")
# How torch writes a symbol with assumptions: Symbol('s31', positive=True, integer=True)
_SYMBOL_CALL = re.compile(r"Symbol\('([a-z]{1,4}\d+)'(?:, ?[a-z]+=(?:True|False))*\)")
_TARGET = re.compile(r"(?:torch\.ops|_operator|math)(?:\.\w+)+|#\w+(?:\.\w+)*(?::\w+)?")


def is_export_archive(path: str) -> bool:
    """A zip written by ``torch.export.save`` (it has an ``archive_format`` record)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any(_rel(n) == "archive_format" for n in archive.namelist()[:64])
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        return False


def _rel(name: str) -> str:
    return name.split("/", 1)[1] if "/" in name else name


def _read_json(archive: zipfile.ZipFile, info: zipfile.ZipInfo, where: str) -> Any:
    if info.file_size > knobs.MAX_HEADER_BYTES:
        raise ScanLimitError(f"{where}: JSON of {info.file_size} bytes is over the header cap")
    try:
        return json.loads(archive.read(info))
    except (ValueError, RecursionError) as exc:
        raise ScanLimitError(f"{where}: not readable JSON ({exc})") from exc


def _config_members(archive: zipfile.ZipFile, infos: list, result: ScanResult) -> set[str]:
    """Names of raw tensor members; TorchScript constants are recorded as problems."""
    raw: set[str] = set()
    pickled: set[str] = set()
    for info in infos:
        rel = _rel(info.filename)
        folder = next((d for d in _CONFIGS if rel.startswith(d)), None)
        if folder is None or not rel.endswith("_config.json"):
            continue
        config = _read_json(archive, info, info.filename).get("config", {})
        for fqn, meta in config.items() if isinstance(config, dict) else []:
            if not isinstance(meta, dict) or not isinstance(meta.get("path_name"), str):
                result.problems.append(f"{info.filename}: entry {fqn!r} has no path_name")
                continue
            name = meta["path_name"]
            if name.startswith("custom_obj_"):
                result.problems.append(
                    f"{info.filename}: {fqn!r} is a TorchScript object ({name}), which "
                    "torch.export.load unpickles with the TorchScript unpickler"
                )
            (pickled if meta.get("use_pickle") or "obj_" in name else raw).add(folder + name)
    # a "raw" name that a loader also reads another way (the legacy <model>.pt record) is not raw
    return {name for name in raw - pickled if not name.endswith(".pt")}


def _problem(result: ScanResult, message: str) -> None:
    if message not in result.problems:
        result.problems.append(message)


def _check_expr(text: Any, where: str, result: ScanResult) -> None:
    """``sympify`` evaluates the string: only arithmetic on symbols and sympy functions."""
    plain = _SYMBOL_CALL.sub(r"\1", text) if isinstance(text, str) else text
    if not isinstance(plain, str) or len(plain) > 10_000 or not _EXPR.fullmatch(plain):
        _problem(result, f"{where}: symbolic expression {text!r:.80} is not arithmetic")
        return
    for name in _NAME.findall(plain):
        if not _SYMBOL.fullmatch(name):
            _problem(result, f"{where}: symbolic expression names {name!r:.40}")


def _check_graph(node: Any, where: str, result: ScanResult, depth: int = 0) -> None:
    """Walk a model JSON: expressions, node targets and guards code that the loader would run."""
    if depth > knobs.MAX_TREE_DEPTH:
        raise ScanLimitError(f"{where}: model JSON nested deeper than {knobs.MAX_TREE_DEPTH}")
    if isinstance(node, list):
        for item in node:
            _check_graph(item, where, result, depth + 1)
    elif isinstance(node, dict):
        for key, value in node.items():
            if key == "expr_str":
                _check_expr(value, where, result)
            elif key == "target" and isinstance(value, str) and "inputs" in node:
                if not _TARGET.fullmatch(value) or "__" in value:
                    result.problems.append(f"{where}: graph node calls {value!r:.80}")
            elif key == "guards_code" and value:
                result.problems.append(
                    f"{where}: guards_code (Python source that program.module() would exec)"
                )
            else:
                _check_graph(value, where, result, depth + 1)


def _member(archive, info, result: ScanResult, raw: set[str], depth: int) -> None:
    rel, where = _rel(info.filename), info.filename
    if info.is_dir() or rel in _TEXT or rel in raw or rel.startswith("extra/"):
        return
    if rel.startswith(_CODE_DIRS):
        result.problems.append(f"{where}: compiled code, which torch.export.load would load")
    elif rel.endswith(".json"):
        if rel.startswith("models/"):
            _check_graph(_read_json(archive, info, where), where, result)
    else:  # anything torch.export.load may unpickle: scanned as torch.load input, strictly
        with _member_stream(archive, info, result) as stream:
            scan_payload(stream, result, where, depth + 1)


def scan_export_archive(path: str, result: ScanResult | None = None) -> ScanResult:
    """Everything in the archive at ``path`` that torch.export.load would run or unpickle."""
    result = result or ScanResult()
    try:
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
            _check_members(infos, path, 0)
            raw = _config_members(archive, infos, result)
            for info in infos:
                _member(archive, info, result, raw, 0)
    except ScanLimitError as exc:
        result.problems.append(str(exc))
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, RuntimeError) as exc:
        result.problems.append(f"{path}: unreadable archive ({type(exc).__name__}: {exc})")
    return result
