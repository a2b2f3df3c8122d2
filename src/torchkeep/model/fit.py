"""Does a saved model still fit the current code of its classes? (architecture-change check)

Two checks, both only for user classes (``torch.nn`` classes are rebuilt exactly as saved):

* **Constructor check.** At save time, when every required ``__init__`` argument of a user
  class is stored as a same-named plain attribute (``self.n_input_features = ...``) and
  ``cls(**those)`` built on the meta device reproduces the module's parameter and buffer shapes,
  the arguments are recorded. At load time the *current* class is built the same way (meta
  device: no memory, no data) and compared: a layer renamed, added, removed or resized shows up
  as missing / unexpected / shape-mismatch rows. This calls the class's own constructor with
  plain data; ``check_fit=False`` skips it.
* **Source check.** Names the current ``forward`` reads as ``self.NAME`` must exist on the
  rebuilt module (as a saved submodule, tensor, attribute, or something of the class itself).
"""

from __future__ import annotations

import ast
import functools
import inspect
import textwrap
import warnings
from typing import Any

import torch
from torch import nn

from ..errors import StateDictMismatchError
from ..state.report import LoadReport


def _is_user_class(cls: type) -> bool:
    return not (cls.__module__ == "torch" or cls.__module__.startswith("torch."))


def _shapes(module: nn.Module) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in module.state_dict(keep_vars=True).items()}


def _build_meta(cls: type, args: dict[str, Any]) -> nn.Module:
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cls(**args)


def init_args(mod: nn.Module, attrs: dict[str, Any]) -> dict[str, Any] | None:
    """Constructor arguments of ``mod`` recoverable from its attributes, verified; else None."""
    cls = type(mod)
    if not _is_user_class(cls) or cls.__init__ is nn.Module.__init__:
        return None
    try:
        params = list(inspect.signature(cls.__init__).parameters.values())[1:]
    except (TypeError, ValueError):
        return None
    args: dict[str, Any] = {}
    for p in params:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if p.name in attrs and p.kind != p.POSITIONAL_ONLY:
            args[p.name] = attrs[p.name]
        elif p.default is p.empty:
            return None
    try:
        reference = _build_meta(cls, args)
    except Exception:  # noqa: BLE001 - any failure only means "no constructor check"
        return None
    return args if _shapes(reference) == _shapes(mod) else None


def _constructor_rows(cls: type, args: dict, built: nn.Module, prefix: str, report: LoadReport):
    try:
        reference = _build_meta(cls, args)
    except Exception as exc:  # noqa: BLE001 - the class changed incompatibly
        report.notes.append(
            f"{prefix or '<root>'}: {cls.__qualname__}(**{args!r}) fails with the current code "
            f"({type(exc).__name__}: {exc})"
        )
        report.missing.append(f"{prefix or '<root>'} (constructor)")
        return
    want, have = _shapes(reference), _shapes(built)
    join = (lambda k: f"{prefix}.{k}") if prefix else (lambda k: k)
    report.missing += [join(k) for k in want if k not in have]
    report.unexpected += [join(k) for k in have if k not in want]
    report.shape_mismatches += [
        (join(k), have[k], want[k]) for k in want if k in have and have[k] != want[k]
    ]


def _probed_name(node: ast.AST) -> str | None:
    """The literal name of ``hasattr(self, "name")`` / ``getattr(...)`` / ``setattr(...)``."""
    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id in ("hasattr", "getattr", "setattr")
        and len(node.args) >= 2
    ):
        name = node.args[1]
        if isinstance(name, ast.Constant) and isinstance(name.value, str):
            return name.value
    return None


@functools.lru_cache(maxsize=256)
def _forward_names(cls: type) -> frozenset[str] | None:
    """``self.NAME`` reads in the class's own ``forward``; None when the source is unavailable.

    Names ``forward`` also assigns, or probes with ``hasattr``/``getattr``, are left out (they
    may be created lazily); a class with its own ``__getattr__`` is not checked at all.
    """
    forward = cls.__dict__.get("forward")
    if forward is None or any(
        "__getattr__" in vars(k) for k in cls.__mro__[: cls.__mro__.index(nn.Module)]
    ):
        return None
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(forward)))
    except (OSError, TypeError, SyntaxError):
        return None
    reads: set[str] = set()
    lazy: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            if node.value.id == "self":
                (reads if isinstance(node.ctx, ast.Load) else lazy).add(node.attr)
        elif (probed := _probed_name(node)) is not None:
            lazy.add(probed)
    return frozenset(reads - lazy)


def _source_rows(cls: type, built: nn.Module, node: dict, prefix: str, report: LoadReport):
    names = _forward_names(cls)
    if not names:
        return
    saved = set(built.__dict__) | set(built._modules) | set(built._parameters) | set(built._buffers)
    known = saved | {n for klass in cls.__mro__ for n in vars(klass)}
    absent = sorted(n for n in names if n not in known)
    if not absent:
        return
    join = (lambda k: f"{prefix}.{k}") if prefix else (lambda k: k)
    report.missing += [join(n) for n in absent]
    unused = [n for n in node.get("modules", {}) if n not in names]
    report.unexpected += [join(n) for n in unused]
    report.notes.append(
        f"{prefix or '<root>'}: {cls.__qualname__}.forward uses {', '.join(absent)}, which the "
        "saved model does not have"
    )


def check_fit(root_node: dict, model: nn.Module, source: str) -> None:
    """Raise :class:`StateDictMismatchError` when the current classes do not fit the saved model."""
    report = LoadReport(source=source)
    stack: list[tuple[dict, nn.Module, str, bool]] = [(root_node, model, "", False)]
    while stack:
        node, built, prefix, covered = stack.pop()
        cls = type(built)
        if _is_user_class(cls):
            if "init_args" in node and not covered:
                _constructor_rows(cls, node["init_args"], built, prefix, report)
                covered = True
            _source_rows(cls, built, node, prefix, report)
        for name, child in node.get("modules", {}).items():
            sub = built._modules.get(name)
            if isinstance(child, dict) and "class" in child and sub is not None:
                path = f"{prefix}.{name}" if prefix else name
                stack.append((child, sub, path, covered))
    if not report.ok:
        raise StateDictMismatchError(
            f"{source}: the saved model does not fit the current code of its classes "
            f"({len(report.missing)} missing, {len(report.unexpected)} unexpected, "
            f"{len(report.shape_mismatches)} shape mismatches):\n{report.table()}\n"
            + "".join(f"{note}\n" for note in report.notes)
            + "The architecture changed since the model was saved. Build the model with the "
            "current code and load the weights that still fit: "
            f"torchkeep.load_state_dict(model, {source!r}, strict=False); or pass "
            "check_fit=False to get the model exactly as saved",
            report,
        )
