"""What kind of checkpoint a view holds, and a whole model's module structure, for ``diff``.

A pickled ``nn.Module`` (``torch.save(model)``, opened with ``--trusted``) and the torchkeep model
file converted from it hold the same things in different shapes: the pickle is a live module,
the torchkeep file has its weights plus a description (``__torchkeep_model__``). Comparing them
means comparing weights and, per submodule path, class and training flag, never the
description's own bookkeeping values.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..model.api import MODEL_ENTRY
from ..readers.view import CheckpointView

Structure = dict[str, dict[str, Any]]  # module path ('' = root) -> {"class", "training"}


def kind_of(view: CheckpointView) -> str:
    """A short description of what the checkpoint holds."""
    if isinstance(getattr(view, "obj", None), nn.Module):
        return "whole model (pickled nn.Module)"
    if _description(view) is not None:
        return "whole model (torchkeep model file)"
    return "tensors and values"


def is_description_value(name: str) -> bool:
    """True for the flattened values of a torchkeep model file's description."""
    return name == MODEL_ENTRY or name.startswith(MODEL_ENTRY + ".")


def structure_of(view: CheckpointView) -> Structure | None:
    """The module tree of a whole-model view, or None when the view holds no model."""
    module = getattr(view, "obj", None)
    if isinstance(module, nn.Module):
        out: Structure = {}
        _walk_module(module, "", out, {})
        return out
    description = _description(view)
    if description is None:
        return None
    out = {}
    _walk_node(description.get("root"), "", out, 0)
    return out


def _description(view: CheckpointView) -> dict | None:
    skeleton = view.skeleton
    if view.format != "torchkeep-model" or not isinstance(skeleton, dict):
        return None
    description = skeleton.get(MODEL_ENTRY)
    return description if isinstance(description, dict) else None


def _walk_module(module: nn.Module, path: str, out: Structure, seen: dict[int, str]) -> None:
    if id(module) in seen:
        out[path] = {"class": f"(same module as {seen[id(module)] or '<root>'})"}
        return
    seen[id(module)] = path
    cls = type(module)
    out[path] = {"class": f"{cls.__module__}:{cls.__qualname__}", "training": module.training}
    for name, child in module._modules.items():
        if child is not None:
            _walk_module(child, f"{path}.{name}" if path else name, out, seen)


def _walk_node(node: Any, path: str, out: Structure, depth: int) -> None:
    if not isinstance(node, dict) or depth > 200:  # file text: bounded, shape-checked
        out[path] = {"class": "(unreadable description)"}
        return
    if isinstance(node.get("shared"), str):
        out[path] = {"class": f"(same module as {node['shared'] or '<root>'})"}
        return
    out[path] = {"class": str(node.get("class")), "training": node.get("training")}
    children = node.get("modules")
    for name, child in children.items() if isinstance(children, dict) else []:
        if child is not None:
            _walk_node(child, f"{path}.{name}" if path else str(name), out, depth + 1)


def compare_structure(a: Structure, b: Structure) -> list[str]:
    """Readable differences between two module trees (empty when they match)."""
    problems = []
    for path in a:
        where = path or "<root>"
        if path not in b:
            problems.append(f"module {where} ({a[path]['class']}) only in A")
        elif a[path] != b[path]:
            problems.append(f"module {where}: A {_show(a[path])} vs B {_show(b[path])}")
    problems += [f"module {p or '<root>'} ({b[p]['class']}) only in B" for p in b if p not in a]
    return problems


def _show(entry: dict[str, Any]) -> str:
    mode = {True: ", training", False: ", eval"}.get(entry.get("training"), "")
    return f"{entry['class']}{mode}"
