"""Rebuild a module tree from its description without running code the caller did not allow.

Every class the file names (module classes, class-valued attributes, configuration objects) is
resolved by the allow rules (see :class:`ClassResolver`) before anything of it is touched, and
only through ``__dict__`` lookups. A module instance is made with ``object.__new__(cls)`` and
filled through ``__setstate__`` (torch's own), as unpickling a module would, but with state that
is plain data from the typed tree. No ``__init__``, and no ``__new__``/``__setstate__``/``__del__``
of a class outside torch, runs unless the caller passed ``trusted=True``; such a class is refused
otherwise (see :mod:`.classes`).
"""

from __future__ import annotations

import importlib
import re
import sys
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from ..errors import ClassNotAllowedError, FormatError
from .capture import FUNCTION_NAMESPACES, INTERNALS, safe_function
from .classes import MODULE_HOOKS, is_torch_class, mro, static_lookup, user_hooks
from .refs import TYPE_OF
from .values import ValueDecoder, class_kind_problem, stateless

_DOTTED = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
ClassesArg = Iterable[type] | Mapping[str, type] | None


def _split(ref: Any, what: str, file: str, path: str) -> tuple[str, str]:
    if not isinstance(ref, str) or ref.count(":") != 1:
        raise FormatError(f"{file}: {what} at {path or '<root>'} is not 'module:name' ({ref!r})")
    module, qual = ref.split(":")
    if what == "class" and qual.endswith(TYPE_OF) and _DOTTED.match(module):
        return module, qual  # the class of a module-level object (checked by _static_get)
    if not (_DOTTED.match(module) and _DOTTED.match(qual)) or "__" in qual:
        raise FormatError(f"{file}: {what} at {path or '<root>'} is malformed ({ref!r})")
    return module, qual


def _static_get(obj: Any, qual: str) -> Any:
    """Follow ``a.b.c`` through ``__dict__`` entries only (no descriptors, no ``__getattr__``).

    ``name@type`` is the class of the public module-level object ``name``.
    """
    if qual.endswith(TYPE_OF):
        name = qual[: -len(TYPE_OF)]
        found = vars(obj).get(name) if _NAME.match(name) and not name.startswith("_") else None
        return None if found is None or isinstance(found, type) else type(found)
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

    def resolve(self, ref: Any, path: str, kind: str = "module", empty: bool = False) -> type:
        """The allowed class ``ref`` names, usable as ``kind`` (module, class, object, mapping)."""
        module, qual = _split(ref, "class", self.file, path)
        cls = self.by_name.get(f"{module}:{qual}")
        if cls is None:
            try:
                cls = self._lookup(module, qual, path, kind)
            except ClassNotAllowedError:
                if qual not in self.by_name:  # a passed class of that name (it moved)
                    raise
                cls = self.by_name[qual]
        problem = class_kind_problem(cls, kind)
        if problem is not None and not (self.trusted and isinstance(cls, type)):
            raise ClassNotAllowedError(
                f"{self.file}: {path or '<root>'} names {module}.{qual}, which {problem}; "
                "refused (nothing was called). The file is not a valid whole-model file, was "
                "crafted to run code, or needs trusted=True"
            )
        if kind == "module":
            self._check_hooks(cls, f"{module}.{qual}", path, empty)
        return cls

    def _check_hooks(self, cls: type, name: str, path: str, empty: bool) -> None:
        """A module without state of its own is filled by torch's ``__setstate__`` instead of
        the class's own (there is nothing for it to restore); other hooks are refused."""
        names = MODULE_HOOKS if not empty else tuple(h for h in MODULE_HOOKS if h != "__setstate__")
        hooks = user_hooks(cls, names)
        if hooks and not self.trusted:
            raise ClassNotAllowedError(
                f"{self.file}: module {path or '<root>'} is a {name}, which defines "
                f"{', '.join(hooks)}: rebuilding it would run that code with data from the file. "
                "Refused (nothing was called); pass trusted=True only if you trust the file, or "
                "build the model yourself and use torchkeep.load_state_dict(model, path)"
            )

    def _lookup(self, module: str, qual: str, path: str, kind: str) -> Any:
        loaded = sys.modules.get(module)
        if loaded is None and (
            self.trusted or (_is_torch_nn(module) and kind in ("module", "class"))
        ):
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

    def __init__(
        self,
        resolver: ClassResolver,
        tensors: dict[str, torch.Tensor],
        file: str,
        objects: Any = None,
    ):
        self.resolver = resolver
        self.tensors = tensors
        self.file = file
        self.built: dict[str, nn.Module] = {}
        self.params: dict[str, nn.Parameter] = {}
        self.values = ValueDecoder(resolver.resolve, objects, resolve_function, file, self.module)

    def module(self, node: Any, path: str) -> nn.Module:
        if not isinstance(node, dict) or not isinstance(node.get("class"), str):
            raise FormatError(f"{self.file}: module {path or '<root>'} is malformed")
        cls = self.resolver.resolve(node["class"], path, "module", stateless(node))
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
            attr_path = self._no_method(cls, name, path)
            state[name] = resolve_function(ref, self.file, attr_path)
        for name, value in _mapping(node.get("values"), self.file, path).items():
            state[name] = self.values.decode(value, self._no_method(cls, name, path))
        for name, ref in _mapping(node.get("tensor_attrs"), self.file, path).items():
            state[_attr_name(name, self.file, path)] = self._tensor_attr(ref, f"{path}.{name}")
        try:
            obj = _new_module(cls, state, self.resolver.trusted)
        except Exception as exc:  # noqa: BLE001 - the class rejected the saved state
            raise FormatError(
                f"{self.file}: module {path or '<root>'} ({cls.__qualname__}) rejects its saved "
                f"state ({type(exc).__name__}: {exc}); the file is damaged or was written for "
                "another version of the class"
            ) from exc
        self.built[path] = obj
        return obj

    def _no_method(self, cls: type, name: str, path: str) -> str:
        """The attribute's path; refuses a non-plain value that would shadow a method."""
        attr_path = f"{path}.{name}" if path else name
        owner, raw = static_lookup(cls, _attr_name(name, self.file, path))
        if owner is not None and hasattr(type(raw), "__get__"):
            raise FormatError(f"{self.file}: {attr_path} would replace a method of {cls}")
        return attr_path

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


def _new_module(cls: type, state: dict, trusted: bool) -> nn.Module:
    """An instance made as unpickling makes it; user hooks ran only if the resolver allowed."""
    if trusted:
        obj = cls.__new__(cls)
        obj.__setstate__(state)
        return obj
    obj = object.__new__(cls)
    torch_setstate = next(vars(k)["__setstate__"] for k in mro(cls)
                          if "__setstate__" in vars(k) and is_torch_class(k))  # fmt: skip
    if torch_setstate is vars(nn.Module)["__setstate__"]:
        # What nn.Module.__setstate__ does with a complete state (every internal is in
        # ``state``), without attribute access through the class (no __getattribute__ runs).
        object.__getattribute__(obj, "__dict__").update(state)
    else:
        torch_setstate(obj, state)  # e.g. nn.LSTM's; the class's own ran only if stateless
    return obj


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
