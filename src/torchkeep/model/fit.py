"""Does a saved model still fit the current code of its classes? (architecture-change check)

Checks for user classes only (``torch.nn`` classes are rebuilt exactly as saved). None of them
runs code of the class unless the caller trusts the file:

* **Source check** (always). The class's current source is parsed, never executed: names its
  ``forward`` reads as ``self.NAME``, and names its own ``__init__`` assigns unconditionally
  (``self.NAME = ...`` at the top level of its body), must exist on the rebuilt module (as a
  saved submodule, tensor, attribute, or something of the class itself). A renamed, added or
  removed layer shows up as missing / unexpected rows.
* **Constructor check** (``trusted=True`` only). At save time, when every required ``__init__``
  argument of a user class is stored as a same-named plain attribute and ``cls(**those)`` built
  on the meta device reproduces the module's shapes, the arguments are recorded. Calling a
  constructor with arguments read from a file runs code the file chose, so at load time the
  current class is rebuilt that way (meta device) and its shapes compared only when the caller
  trusts the file; it then also catches resized layers.
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


def _is_probe(node: ast.AST) -> bool:
    """``hasattr(self, "name")`` / ``getattr(...)`` / ``setattr(...)`` with a literal name."""
    return (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id in ("hasattr", "getattr", "setattr")
        and len(node.args) >= 2
        and isinstance(node.args[1], ast.Constant)
        and isinstance(node.args[1].value, str)
    )


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
    reads, lazy = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            if node.value.id == "self" and not isinstance(node.ctx, ast.Load):
                lazy.add(node.attr)
        elif _is_probe(node):
            lazy.add(node.args[1].value)
    func = tree.body[0] if tree.body else None
    reads = {n.attr for n in _always_run(getattr(func, "body", [])) if _self_attr(n, ast.Load)}
    return frozenset(reads - lazy)


def _self_attr(node: ast.AST, ctx: type) -> bool:
    """``self.NAME`` in the given context (load or store)."""
    return (
        isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Name)
        and node.value.id == "self"
        and isinstance(node.ctx, ctx)
    )


def _always_run(body: list[ast.AST]) -> list[ast.AST]:
    """Nodes of ``body`` evaluated on every call: branches, loop bodies, handlers, the right
    side of ``and``/``or`` and nested functions are left out (a layer used only when an
    optional argument is given, as in Hugging Face blocks, may be absent)."""
    out: list[ast.AST] = []
    stack = list(body)
    while stack:
        node = stack.pop()
        out.append(node)
        if isinstance(node, (ast.If, ast.While, ast.IfExp)):
            stack.append(node.test)
        elif isinstance(node, (ast.For, ast.AsyncFor)):
            stack.append(node.iter)
        elif isinstance(node, ast.BoolOp):
            stack.append(node.values[0])
        elif isinstance(node, ast.Try):
            stack += node.body + node.finalbody
        elif isinstance(node, ast.Match):
            stack.append(node.subject)
        elif not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda,
                                   ast.ClassDef, ast.comprehension)):  # fmt: skip
            stack += list(ast.iter_child_nodes(node))
    return out


def _unconditional_self_assigns(body: list[ast.stmt]) -> set[str]:
    names = set()
    for stmt in body:
        targets = stmt.targets if isinstance(stmt, ast.Assign) else []
        if isinstance(stmt, (ast.AnnAssign, ast.AugAssign)) and stmt.value is not None:
            targets = [stmt.target]
        for target in targets:
            names.update(n.attr for n in ast.walk(target) if _self_attr(n, ast.Store))
    return names


@functools.lru_cache(maxsize=256)
def _init_names(cls: type) -> frozenset[str]:
    """Names the class's own ``__init__`` always assigns as ``self.NAME`` (parsed, not run).

    Left out when the class customizes pickling (``__getstate__`` may drop attributes) or
    deletes attributes anywhere in ``__init__``.
    """
    init = vars(cls).get("__init__")
    if init is None or "__getstate__" in vars(cls):
        return frozenset()
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(init)))
    except (OSError, TypeError, SyntaxError):
        return frozenset()
    func = tree.body[0] if tree.body else None
    if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
        return frozenset()
    if any(isinstance(node, ast.Delete) for node in ast.walk(func)):
        return frozenset()
    return frozenset(_unconditional_self_assigns(func.body))


def _source_rows(cls: type, built: nn.Module, node: dict, prefix: str, report: LoadReport):
    names = (_forward_names(cls) or frozenset()) | _init_names(cls)
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


def check_fit(root_node: dict, model: nn.Module, source: str, trusted: bool = False) -> None:
    """Raise :class:`StateDictMismatchError` when the current classes do not fit the saved model.

    Constructors run (on the meta device, with the saved arguments) only when ``trusted``.
    """
    report = LoadReport(source=source)
    stack: list[tuple[dict, nn.Module, str, bool]] = [(root_node, model, "", False)]
    while stack:
        node, built, prefix, covered = stack.pop()
        cls = type(built)
        if _is_user_class(cls):
            if trusted and "init_args" in node and not covered:
                _constructor_rows(cls, node["init_args"], built, prefix, report)
                covered = True
            _source_rows(cls, built, node, prefix, report)
        for name, child in node.get("modules", {}).items():
            if isinstance(child, dict) and "class" in child:
                path = f"{prefix}.{name}" if prefix else name
                stack.append((child, built._modules[name], path, covered))
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
