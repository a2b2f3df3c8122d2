"""Describe a module tree as plain data: class paths, attributes, parameters and buffers.

The description holds what a pickle of the module holds (its ``__dict__``), minus code: each
module's class is recorded by import path, plain attributes by value, functions only by a
reference into an allow-listed namespace (``torch.nn.functional``, ``torch``, ``operator``), and
tensors by their state-dict key. Shared tensors and shared submodules are recorded once and
referenced by path, so ties survive the round trip. Anything else fails here, before a byte is
written, naming the attribute path.
"""

from __future__ import annotations

import operator
import sys
import types
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UnsupportedValueError
from .fit import init_args

#: ``Module.__init__``'s own bookkeeping; these are rebuilt fresh, never stored as attributes.
INTERNALS = frozenset(nn.Module().__dict__) | {"_compiled_call_impl"}
#: Caches torch adds to a module's ``__dict__`` at run time (TorchScript overloads); not saved.
RUNTIME_ONLY = frozenset({"__overloads__"})
STRUCTURE = ("training", "_parameters", "_buffers", "_non_persistent_buffers_set", "_modules")
#: Namespaces whose functions may be referenced by name (resolved without importing anything).
FUNCTION_NAMESPACES = (("torch.nn.functional", F), ("torch", torch), ("operator", operator))
_SCALARS = (type(None), bool, int, float, str, bytes, complex, torch.dtype, torch.device)


@dataclass
class Capture:
    """The description of one model: ``root`` node, and tensors by state-dict-style key."""

    root: dict
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # persistent (state_dict)
    extra: dict[str, torch.Tensor] = field(default_factory=dict)  # non-persistent buffers
    hooks_dropped: list[str] = field(default_factory=list)


def class_path(cls: type, where: str = "<root>") -> str:
    """``module:qualname`` of a class; refuses classes that cannot be found again by name."""
    qual = cls.__qualname__
    if "<locals>" in qual or "<" in cls.__module__:
        raise UnsupportedValueError(
            f"{where}: class {cls.__module__}.{qual} is defined inside a function and cannot "
            "be found again when loading; define it at module level"
        )
    module = sys.modules.get(cls.__module__)
    found: Any = module
    for part in qual.split("."):
        found = vars(found).get(part) if hasattr(found, "__dict__") else None
    if found is not cls:
        raise UnsupportedValueError(
            f"{where}: class {cls.__module__}.{qual} cannot be found again by its name (created "
            "dynamically, e.g. by torch.nn.utils.parametrize); remove the parametrizations "
            "(parametrize.remove_parametrizations) before saving, or save the state_dict"
        )
    return f"{cls.__module__}:{qual}"


def safe_function(namespace: str, fn: Any) -> bool:
    """Builtin ops of ``torch``/``operator``; Python functions only from torch.nn.functional."""
    if isinstance(fn, type) or not callable(fn):
        return False
    if isinstance(fn, types.BuiltinFunctionType):
        return True
    return namespace == "torch.nn.functional" and getattr(fn, "__module__", None) == namespace


def function_ref(fn: Any, path: str) -> str:
    """``namespace:name`` of an allow-listed function, or :class:`UnsupportedValueError`."""
    for name, namespace in FUNCTION_NAMESPACES:
        attr = getattr(fn, "__name__", None)
        if isinstance(attr, str) and vars(namespace).get(attr) is fn and safe_function(name, fn):
            return f"{name}:{attr}"
    for name, namespace in FUNCTION_NAMESPACES:
        for key, value in vars(namespace).items():
            if value is fn and not key.startswith("_") and safe_function(name, fn):
                return f"{name}:{key}"
    raise UnsupportedValueError(
        f"{path}: the callable {fn!r} cannot be saved safely; only functions of "
        "torch.nn.functional, torch and operator are stored (by name). Replace it with one of "
        "those or with an nn.Module (e.g. nn.GELU()), or save the state_dict instead"
    )


class _Capturer:
    def __init__(self, drop_hooks: bool) -> None:
        self.drop_hooks = drop_hooks
        self.out = Capture(root={})
        self.module_paths: dict[int, str] = {}
        self.tensor_keys: dict[int, str] = {}

    def module(self, mod: nn.Module, prefix: str) -> dict:
        self.module_paths[id(mod)] = prefix
        where = prefix or "<root>"
        node: dict[str, Any] = {"class": class_path(type(mod), where)}
        node["training"] = mod.training is True
        self._hooks(mod, where)
        node["params"] = self._tensors(mod._parameters, prefix, persistent=set(mod._parameters))
        node["buffers"] = self._tensors(
            mod._buffers, prefix, persistent=set(mod._buffers) - mod._non_persistent_buffers_set
        )
        node["non_persistent"] = sorted(mod._non_persistent_buffers_set & set(mod._buffers))
        node["modules"] = {name: self._child(child, _join(prefix, name))
                           for name, child in mod._modules.items()}  # fmt: skip
        node["attrs"], node["functions"], node["tensor_attrs"] = self._attrs(mod, prefix)
        args = init_args(mod, node["attrs"])
        if args is not None:
            node["init_args"] = args
        return node

    def _child(self, child: nn.Module | None, path: str) -> Any:
        if child is None:
            return None
        if id(child) in self.module_paths:
            return {"shared": self.module_paths[id(child)]}
        return self.module(child, path)

    def _hooks(self, mod: nn.Module, where: str) -> None:
        for name in sorted(INTERNALS - set(STRUCTURE)):
            value = mod.__dict__.get(name)
            if not isinstance(value, (dict, set)) or not value:
                continue
            if not self.drop_hooks:
                raise UnsupportedValueError(
                    f"{where}: the module has {name} registered; hooks are Python callables and "
                    "are not saved. Remove them before saving, or pass drop_hooks=True to save "
                    "the model without them (re-register them after load_model)"
                )
            self.out.hooks_dropped.append(f"{where}.{name}")

    def _tensors(self, table: dict, prefix: str, persistent: set[str]) -> dict[str, Any]:
        refs: dict[str, Any] = {}
        for name, tensor in table.items():
            if tensor is None:
                refs[name] = None
                continue
            key = _join(prefix, name)
            if name in persistent:
                self.out.tensors[key] = tensor
            first = self.tensor_keys.setdefault(id(tensor), key)
            if first == key and name not in persistent:
                self.out.extra[key] = tensor
            refs[name] = first
        return refs

    def _attrs(self, mod: nn.Module, prefix: str) -> tuple[dict, dict, dict]:
        """(plain attributes, function references, references to the module tree's tensors)."""
        attrs: dict[str, Any] = {}
        functions: dict[str, str] = {}
        refs: dict[str, Any] = {}
        for name, value in _state(mod, prefix).items():
            if name in INTERNALS or name in RUNTIME_ONLY:
                continue
            path = _join(prefix, name)
            if name.startswith("__") or not name.isidentifier():
                raise UnsupportedValueError(
                    f"{path}: attribute names that are not identifiers or start with '__' are "
                    "not saved (they could shadow Python internals on load); rename it"
                )
            ref = self._tensor_ref(value)
            if ref is not None:
                refs[name] = ref
            elif callable(value) and not isinstance(value, (type, torch.dtype)):
                if isinstance(value, nn.Module):
                    raise UnsupportedValueError(
                        f"{path}: a module stored outside _modules (object.__setattr__) cannot "
                        "be saved; assign it as a submodule"
                    )
                functions[name] = function_ref(value, path)
            else:
                check_plain(value, path)
                attrs[name] = value
        return attrs, functions, refs

    def _tensor_ref(self, value: Any) -> dict | None:
        """An attribute that is (a list of) parameters/buffers already saved: keep the identity.

        E.g. ``nn.LSTM._flat_weights`` lists the LSTM's own parameters.
        """
        if isinstance(value, torch.Tensor):
            key = self.tensor_keys.get(id(value))
            return {"key": key} if key is not None else None
        if type(value) in (list, tuple) and value:
            keys = [None if v is None else self.tensor_keys.get(id(v), "") for v in value]
            if any(keys) and all(k != "" for k in keys):
                return {"keys": keys, "tuple": type(value) is tuple}
        return None


def _state(mod: nn.Module, prefix: str) -> dict[str, Any]:
    """What pickling would store: the class's ``__getstate__`` (drops e.g. RNN weak references)."""
    state = mod.__getstate__()
    if not isinstance(state, dict):
        raise UnsupportedValueError(
            f"{prefix or '<root>'}: {type(mod).__qualname__}.__getstate__ returns a "
            f"{type(state).__qualname__}, not a dict; such modules cannot be saved as whole "
            "models; save the state_dict instead"
        )
    return state


def check_plain(value: Any, path: str, depth: int = 0) -> None:
    """Refuse anything but plain data (scalars, dtypes, tensors, containers of them)."""
    if depth > 32:
        raise UnsupportedValueError(f"{path}: nested too deeply")
    kind = type(value)
    if kind in _SCALARS or kind is torch.Size or isinstance(value, torch.dtype):
        return
    if kind in (torch.Tensor, nn.Parameter):
        return
    if kind in (list, tuple, set, frozenset):
        for i, item in enumerate(value):
            check_plain(item, f"{path}[{i}]", depth + 1)
        return
    if kind in (dict, OrderedDict):
        for key, item in value.items():
            check_plain(key, f"{path}[{key!r}]", depth + 1)
            check_plain(item, f"{path}[{key!r}]", depth + 1)
        return
    what = "a function" if callable(value) else f"a {kind.__module__}.{kind.__qualname__}"
    raise UnsupportedValueError(
        f"{path}: {what} cannot be saved safely (whole-model files store numbers, strings, "
        "bools, None, dtypes, devices, tensors and tuples/lists/dicts of them, and functions of "
        "torch.nn.functional/torch/operator as direct attributes); remove the attribute, make it "
        "plain data, or save the state_dict instead"
    )


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside torch.compile / DataParallel / DistributedDataParallel wrappers."""
    wrappers = (nn.DataParallel, nn.parallel.DistributedDataParallel)
    for _ in range(8):
        inner = None
        if type(model).__name__ == "OptimizedModule":
            inner = model._modules.get("_orig_mod")
        elif isinstance(model, wrappers):
            inner = model.module
        if inner is None:
            return model
        model = inner
    return model


def capture(model: nn.Module, *, drop_hooks: bool = False) -> Capture:
    """Describe ``model`` (wrappers removed); raises before anything is written."""
    if not isinstance(model, nn.Module):
        raise UnsupportedValueError(
            f"save_model expects an nn.Module, got {type(model).__qualname__}; use "
            "torchkeep.save for state dicts and other objects"
        )
    if isinstance(model, torch.jit.ScriptModule):
        raise UnsupportedValueError(
            "save_model got a TorchScript module; its code lives in C++, not in Python classes. "
            "Save it with torch.jit.save, or save the original (unscripted) module"
        )
    capturer = _Capturer(drop_hooks)
    capturer.out.root = capturer.module(unwrap(model), "")
    return capturer.out
