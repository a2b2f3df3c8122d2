"""Rebuild a module tree from its description without running code the caller did not allow.

Classes are resolved by the allow rules (see :class:`ClassResolver`); an instance is made with
``cls.__new__(cls)`` and filled through the class's ``__setstate__`` (``nn.Module.__setstate__``
unless the allowed class overrides it), exactly as unpickling a module would, but with state
that is plain data from the typed tree. No ``__init__`` and no callable named by the file runs.
"""

from __future__ import annotations

import importlib
import inspect
import re
import sys
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from ..errors import ClassNotAllowedError, FormatError
from .capture import FUNCTION_NAMESPACES, INTERNALS, safe_function

_DOTTED = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
ClassesArg = Iterable[type] | Mapping[str, type] | None


def _split(ref: Any, what: str, file: str, path: str) -> tuple[str, str]:
    if not isinstance(ref, str) or ref.count(":") != 1:
        raise FormatError(f"{file}: {what} at {path or '<root>'} is not 'module:name' ({ref!r})")
    module, qual = ref.split(":")
    if not (_DOTTED.match(module) and _DOTTED.match(qual)) or "__" in qual:
        raise FormatError(f"{file}: {what} at {path or '<root>'} is malformed ({ref!r})")
    return module, qual


def _static_get(obj: Any, qual: str) -> Any:
    """Follow ``a.b.c`` through ``__dict__`` entries only (no descriptors, no ``__getattr__``)."""
    for part in qual.split("."):
        namespace = vars(obj) if hasattr(obj, "__dict__") else {}
        if part not in namespace:
            return None
        obj = namespace[part]
    return obj


def _is_torch_nn(module: str) -> bool:
    return module == "torch.nn" or module.startswith("torch.nn.")


class ClassResolver:
    """Find the class a saved module names, following the allow rules.

    Allowed: classes in ``classes`` (a list, or a dict mapping saved ``module:qualname`` or
    ``qualname`` to the class to use, for classes that moved); ``torch.nn`` classes; classes whose
    module the caller has already imported; with ``trusted=True`` any importable class. Only
    ``nn.Module`` subclasses are accepted. Nothing is imported unless it is ``torch.nn`` or trusted.
    """

    def __init__(self, classes: ClassesArg, trusted: bool, file: str) -> None:
        self.trusted = trusted
        self.file = file
        self.by_name: dict[str, type] = {}
        if isinstance(classes, Mapping):
            self.by_name.update(classes)
        else:
            for cls in classes or ():
                self.by_name[f"{cls.__module__}:{cls.__qualname__}"] = cls
                self.by_name.setdefault(cls.__qualname__, cls)

    def resolve(self, ref: Any, path: str) -> type[nn.Module]:
        module, qual = _split(ref, "class", self.file, path)
        cls = self.by_name.get(f"{module}:{qual}")
        if cls is None:
            try:
                cls = self._lookup(module, qual, path)
            except ClassNotAllowedError:
                if qual not in self.by_name:  # a passed class of that name (it moved)
                    raise
                cls = self.by_name[qual]
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise ClassNotAllowedError(
                f"{self.file}: module {path or '<root>'} names {module}.{qual}, which is not an "
                "nn.Module subclass; refused (nothing was called). The file is not a valid "
                "whole-model file or was crafted to run code"
            )
        return cls

    def _lookup(self, module: str, qual: str, path: str) -> Any:
        loaded = sys.modules.get(module)
        if loaded is None and (self.trusted or _is_torch_nn(module)):
            try:
                loaded = importlib.import_module(module)
            except ImportError as exc:
                raise ClassNotAllowedError(
                    f"{self.file}: class {module}.{qual} (module {path or '<root>'}) cannot be "
                    f"imported ({exc}); install or rename it, or map the saved name to the "
                    f"current class with classes={{'{module}:{qual}': NewClass}}"
                ) from exc
        if loaded is None:
            raise ClassNotAllowedError(
                f"{self.file}: module {path or '<root>'} needs class {module}.{qual}, whose "
                f"module {module!r} is not imported, and torchkeep does not import code on its "
                f"own. Allow it by importing it first (from {module} import "
                f"{qual.split('.')[0]}), by passing classes=[{qual}], or, only if you trust the "
                "file, with trusted=True"
            )
        cls = _static_get(loaded, qual)
        if cls is None:
            raise ClassNotAllowedError(
                f"{self.file}: module {path or '<root>'} needs class {module}.{qual}, but "
                f"{module} has no {qual!r} (renamed or moved?); pass "
                f"classes={{'{module}:{qual}': TheClass}} to say which class to use"
            )
        return cls


def resolve_function(ref: Any, file: str, path: str) -> Any:
    """The allow-listed function a saved ``namespace:name`` reference names."""
    module, name = _split(ref, "function", file, path)
    namespaces = dict(FUNCTION_NAMESPACES)
    known = module in namespaces and _NAME.match(name) and not name.startswith("_")
    fn = vars(namespaces[module]).get(name) if known else None
    if fn is None or not safe_function(module, fn):
        raise ClassNotAllowedError(
            f"{file}: attribute {path} names the function {module}.{name}; only functions of "
            "torch.nn.functional, torch and operator are resolved; refused (nothing was called)"
        )
    return fn


class Rebuilder:
    """Turns decoded module nodes into modules; tensors come from ``tensors`` by key."""

    def __init__(self, resolver: ClassResolver, tensors: dict[str, torch.Tensor], file: str):
        self.resolver = resolver
        self.tensors = tensors
        self.file = file
        self.built: dict[str, nn.Module] = {}
        self.params: dict[str, nn.Parameter] = {}

    def module(self, node: Any, path: str) -> nn.Module:
        if not isinstance(node, dict) or not isinstance(node.get("class"), str):
            raise FormatError(f"{self.file}: module {path or '<root>'} is malformed")
        cls = self.resolver.resolve(node["class"], path)
        state = {name: _fresh(value) for name, value in _TEMPLATE.items()}
        state["training"] = node.get("training") is True
        state["_parameters"] = self._table(node.get("params"), path, parameter=True)
        state["_buffers"] = self._table(node.get("buffers"), path, parameter=False)
        non_persistent = node.get("non_persistent", [])
        if not (isinstance(non_persistent, list) and all(type(n) is str for n in non_persistent)):
            raise FormatError(f"{self.file}: module {path or '<root>'}: bad non_persistent list")
        state["_non_persistent_buffers_set"] = set(non_persistent)
        state["_modules"] = self._children(node.get("modules"), path)
        for name, value in _mapping(node.get("attrs"), self.file, path).items():
            state[_attr_name(name, self.file, path)] = value
        for name, ref in _mapping(node.get("functions"), self.file, path).items():
            attr_path = f"{path}.{name}" if path else name
            if callable(inspect.getattr_static(cls, _attr_name(name, self.file, path), None)):
                raise FormatError(f"{self.file}: {attr_path} would replace a method of {cls}")
            state[name] = resolve_function(ref, self.file, attr_path)
        for name, ref in _mapping(node.get("tensor_attrs"), self.file, path).items():
            state[_attr_name(name, self.file, path)] = self._tensor_attr(ref, f"{path}.{name}")
        obj = cls.__new__(cls)
        try:
            obj.__setstate__(state)
        except Exception as exc:  # noqa: BLE001 - the class rejected the saved state
            raise FormatError(
                f"{self.file}: module {path or '<root>'} ({cls.__qualname__}) rejects its saved "
                f"state ({type(exc).__name__}: {exc}); the file is damaged or was written for "
                "another version of the class"
            ) from exc
        self.built[path] = obj
        return obj

    def _children(self, table: Any, path: str) -> dict[str, Any]:
        children: dict[str, Any] = {}
        for name, child in _mapping(table, self.file, path).items():
            child_path = f"{path}.{name}" if path else name
            if child is None:
                children[name] = None
            elif isinstance(child, dict) and set(child) == {"shared"}:
                if child["shared"] not in self.built:
                    raise FormatError(f"{self.file}: {child_path} shares an unknown module")
                children[name] = self.built[child["shared"]]
            else:
                children[name] = self.module(child, child_path)
        return children

    def _table(self, table: Any, path: str, parameter: bool) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, key in _mapping(table, self.file, path).items():
            if key is None:
                out[name] = None
                continue
            where = f"{path}.{name}" if path else name
            if not isinstance(key, str) or key not in self.tensors:
                raise FormatError(f"{self.file}: {where} refers to no tensor")
            out[name] = self._param(key) if parameter else self.tensors[key]
        return out

    def _tensor(self, key: Any, path: str) -> torch.Tensor:
        if not isinstance(key, str) or key not in self.tensors:
            raise FormatError(f"{self.file}: {path} refers to no tensor")
        tensor = self.tensors[key]
        return self._param(key) if isinstance(tensor, nn.Parameter) else tensor

    def _tensor_attr(self, ref: Any, path: str) -> Any:
        """A (list of) tensor(s) of the module tree referenced by an attribute, same objects."""
        if isinstance(ref, dict) and set(ref) == {"key"}:
            return self._tensor(ref["key"], path)
        keys = ref.get("keys") if isinstance(ref, dict) and set(ref) == {"keys", "tuple"} else None
        if isinstance(keys, list):
            items = [None if k is None else self._tensor(k, path) for k in keys]
            return tuple(items) if ref["tuple"] is True else items
        raise FormatError(f"{self.file}: tensor attribute {path} is malformed")

    def _param(self, key: str) -> nn.Parameter:
        """One Parameter object per saved tensor, so tied weights stay tied."""
        if key not in self.params:
            tensor = self.tensors[key]
            if not isinstance(tensor, nn.Parameter):
                tensor = nn.Parameter(tensor, requires_grad=tensor.is_floating_point())
            self.params[key] = tensor
        return self.params[key]


_TEMPLATE = {k: v for k, v in nn.Module().__dict__.items() if k in INTERNALS}


def _fresh(value: Any) -> Any:
    return type(value)() if isinstance(value, (dict, set)) else value


def _mapping(value: Any, file: str, path: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise FormatError(f"{file}: module {path or '<root>'}: expected a mapping by name")
    return value


def _attr_name(name: str, file: str, path: str) -> str:
    if not _NAME.match(name) or name.startswith("__") or name in INTERNALS:
        raise FormatError(f"{file}: module {path or '<root>'}: attribute name {name!r} refused")
    return name
