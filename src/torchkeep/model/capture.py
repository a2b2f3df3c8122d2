"""Describe a module tree as plain data: class paths, attributes, parameters and buffers.

The description holds what a pickle of the module holds (its ``__dict__``), minus code: each
module's class is recorded by import path, plain attributes by value, functions only by a
reference into an allow-listed namespace (``torch.nn.functional``, ``torch``, ``operator``), and
tensors by their state-dict key. Shared tensors and shared submodules are recorded once and
referenced by path, so ties survive the round trip. Anything else fails here, before a byte is
written, naming the attribute path.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import UnsupportedValueError
from .classes import MODULE_HOOKS, user_hooks
from .fit import init_args
from .refs import FUNCTION_NAMESPACES, check_plain, class_path, function_ref, safe_function
from .values import ValueEncoder, is_plain, stateless

__all__ = [
    "FUNCTION_NAMESPACES",
    "INTERNALS",
    "capture",
    "check_plain",
    "class_path",
    "safe_function",
]

#: ``Module.__init__``'s own bookkeeping; these are rebuilt fresh, never stored as attributes.
INTERNALS = frozenset(nn.Module().__dict__) | {"_compiled_call_impl"}
#: Caches torch adds to a module's ``__dict__`` at run time (TorchScript overloads); not saved.
RUNTIME_ONLY = frozenset({"__overloads__"})
STRUCTURE = ("training", "_parameters", "_buffers", "_non_persistent_buffers_set", "_modules")


@dataclass
class Capture:
    """The description of one model: ``root`` node, and tensors by state-dict-style key."""

    root: dict
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # persistent (state_dict)
    extra: dict[str, torch.Tensor] = field(default_factory=dict)  # non-persistent buffers
    hooks_dropped: list[str] = field(default_factory=list)
    needs_trust: dict[str, list[str]] = field(default_factory=dict)  # class path -> its hooks
    objects: list[dict] = field(default_factory=list)  # configuration objects, by index


class _Capturer:
    def __init__(self, drop_hooks: bool) -> None:
        self.drop_hooks = drop_hooks
        self.out = Capture(root={})
        self.module_paths: dict[int, str] = {}
        self.tensor_keys: dict[int, str] = {}
        self.values = ValueEncoder(self.module)
        self.out.objects = self.values.objects

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
        node["attrs"], node["functions"], node["tensor_attrs"], values = self._attrs(mod, prefix)
        if values:
            node["values"] = values
        hooks = user_hooks(type(mod), MODULE_HOOKS)
        if stateless(node):
            hooks = [h for h in hooks if not h.endswith(".__setstate__")]
        if hooks:
            self.out.needs_trust[node["class"]] = hooks
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

    def _attrs(self, mod: nn.Module, prefix: str) -> tuple[dict, dict, dict, dict]:
        """(plain attributes, function references, references to the module tree's tensors,
        encoded classes / configuration objects / containers of them)."""
        attrs: dict[str, Any] = {}
        functions: dict[str, str] = {}
        refs: dict[str, Any] = {}
        values: dict[str, Any] = {}
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
            elif isinstance(value, nn.Module):
                raise UnsupportedValueError(
                    f"{path}: a module stored outside _modules (object.__setattr__) cannot "
                    "be saved; assign it as a submodule"
                )
            elif callable(value) and not isinstance(value, (type, torch.dtype)):
                try:
                    functions[name] = function_ref(value, path)
                except UnsupportedValueError:
                    values[name] = self.values.encode(value, path)
            elif is_plain(value, path):
                attrs[name] = value
            else:
                values[name] = self.values.encode(value, path)
        return attrs, functions, refs, values

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
