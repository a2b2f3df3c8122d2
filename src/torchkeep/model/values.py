"""Attribute values beyond plain data: classes, configuration objects, and containers of them.

Encoded as tagged one-key dicts so the typed tree stores them as data:

* ``{"plain": v}`` - plain data (numbers, strings, tensors, containers of those);
* ``{"class": "module:QualName"}`` - a class (``self._norm_layer = nn.BatchNorm2d``);
* ``{"function": "namespace:name"}`` - an allow-listed function (see :mod:`.refs`);
* ``{"object": i}`` - entry ``i`` of the model's object table, ``{"class": ..., "state": {..}}``
  (a ``PretrainedConfig``, a dataclass), plus ``"items": [[key, value], ...]`` for a ``dict``
  subclass (Lightning's ``AttributeDict``); an object reached twice is stored once, so
  ``model.config is model.transformer.config`` stays true after loading;
* ``{"module": node}`` - a module without state of its own (no parameters, buffers,
  submodules or attributes) kept in a container attribute, described like a submodule (the
  ``kernels`` package's per-layer function wrappers in Hugging Face attention layers);
* ``{"partial": [func, args, keywords]}`` - ``functools.partial`` of an allowed class or function
  (timm-style ``norm_layer=partial(nn.LayerNorm, eps=1e-6)``); rebuilt without calling ``func``;
* ``{"list"|"tuple": [...]}``, ``{"dict": [[key, value], ...]}`` - containers (plain keys).

Decoding resolves every class through the caller's allow-list (the resolver passed in) and makes
objects with ``object.__new__`` plus a ``__dict__`` update: no ``__init__`` and no callable
named by the file runs.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from torch import nn

from ..errors import FormatError, UnsupportedValueError
from .classes import data_class_problem, is_module_class
from .refs import check_plain, class_path, function_ref

MAX_DEPTH = 32
_SEQUENCES = {"list": list, "tuple": tuple}


#: Entries of a module node that hold state (see :mod:`.capture`).
STATE_KEYS = ("params", "buffers", "modules", "attrs", "functions", "tensor_attrs", "values")


def stateless(node: dict) -> bool:
    """A module node with nothing of its own but its class and training flag."""
    return not any(node.get(key) for key in STATE_KEYS) and "init_args" not in node


def is_plain(value: Any, path: str) -> bool:
    try:
        check_plain(value, path)
    except UnsupportedValueError:
        return False
    return True


class ValueEncoder:
    """Encodes attribute values of one model; owns its object table."""

    def __init__(self, module: Callable[[Any, str], dict]) -> None:
        self.module = module  # describes a module (the capturer's)
        self.objects: list[dict] = []
        self._memo: dict[int, int] = {}
        self._keep: list[Any] = []  # keeps ids stable while encoding

    def encode(self, value: Any, path: str, depth: int = 0) -> dict:
        if depth > MAX_DEPTH:
            raise UnsupportedValueError(f"{path}: nested too deeply")
        if is_plain(value, path):
            return {"plain": value}
        if isinstance(value, type):
            return {"class": class_path(value, path)}
        kind = type(value)
        if kind in (list, tuple):
            items = [self.encode(v, f"{path}[{i}]", depth + 1) for i, v in enumerate(value)]
            return {kind.__name__: items}
        if kind is dict:
            return {"dict": [self._item(k, v, path, depth) for k, v in value.items()]}
        if kind is functools.partial:
            return {"partial": self._partial(value, path, depth)}
        if isinstance(value, nn.Module):
            node = self.module(value, path)
            if not stateless(node):
                raise UnsupportedValueError(
                    f"{path}: a module with state (parameters, buffers, submodules or "
                    "attributes) kept outside _modules cannot be saved; register it as a "
                    "submodule (nn.ModuleDict / nn.ModuleList)"
                )
            return {"module": node}
        if callable(value) and data_class_problem(kind) is not None:
            return {"function": function_ref(value, path)}
        return {"object": self._object(value, path, depth)}

    def _partial(self, value: functools.partial, path: str, depth: int) -> list:
        if vars(value):
            raise UnsupportedValueError(f"{path}: a functools.partial with attributes of its own")
        func = value.func
        if not isinstance(func, type):  # a class, or an allow-listed function
            func_node = {"function": function_ref(func, path)}
        else:
            func_node = {"class": class_path(func, path)}
        args = self.encode(list(value.args), f"{path}.args", depth + 1)
        keywords = self.encode(dict(value.keywords), f"{path}.keywords", depth + 1)
        return [func_node, args, keywords]

    def _item(self, key: Any, value: Any, path: str, depth: int) -> list:
        where = f"{path}[{key!r}]"
        if not key_ok(key):
            raise UnsupportedValueError(
                f"{where}: keys of a dict holding classes or objects must be strings, bools, "
                "None or integers below 2**61"
            )
        return [key, self.encode(value, where, depth + 1)]

    def _object(self, obj: Any, path: str, depth: int) -> int:
        if id(obj) in self._memo:
            return self._memo[id(obj)]
        cls = type(obj)
        mapping = isinstance(obj, dict)
        problem = data_class_problem(cls, dict if mapping else object)
        if problem is None and not isinstance(getattr(obj, "__dict__", None), dict):
            problem = "it has no __dict__"
        if problem is not None:
            raise UnsupportedValueError(
                f"{path}: a {cls.__module__}.{cls.__qualname__} cannot be saved safely: "
                f"{problem}. Whole-model files store plain data, classes, and objects whose "
                "state is plain data in __dict__ (configuration objects, dataclasses); remove "
                "the attribute, make it plain data, or save the state_dict instead"
            )
        index = self._memo[id(obj)] = len(self.objects)
        self._keep.append(obj)
        entry: dict[str, Any] = {"class": class_path(cls, path)}
        self.objects.append(entry)
        entry["state"] = {
            _state_name(name, path): self.encode(v, f"{path}.{name}", depth + 1)
            for name, v in vars(obj).items()
        }
        if mapping:
            entry["items"] = [self._item(k, v, path, depth) for k, v in dict.items(obj)]
        return index


def _state_name(name: Any, path: str) -> str:
    if not isinstance(name, str) or not name.isidentifier() or name.startswith("__"):
        raise UnsupportedValueError(f"{path}: attribute name {name!r} cannot be saved")
    return name


Resolve = Callable[[Any, str, str], type]  # (reference, path, kind) -> allowed class


class ValueDecoder:
    """Rebuilds encoded values; classes come only from ``resolve`` (the caller's allow-list)."""

    def __init__(
        self, resolve: Resolve, table: Any, functions: Callable, file: str, module: Callable
    ) -> None:
        self.resolve = resolve
        self.functions = functions
        self.module = module  # rebuilds a module node (the rebuilder's)
        self.file = file
        if table is None:
            table = []
        if not isinstance(table, list):
            raise FormatError(f"{file}: the whole-model object table is malformed")
        self.table = table
        self.objects: list[Any] = []
        for i, item in enumerate(table):  # pass 1: classes decided, bare instances made
            keys = set(item) if isinstance(item, dict) else set()
            if keys not in ({"class", "state"}, {"class", "state", "items"}):
                raise FormatError(f"{file}: object {i} of the whole-model file is malformed")
            kind = "mapping" if "items" in keys else "object"
            cls = resolve(item["class"], f"<object {i}>", kind)
            self.objects.append(_bare(cls, file, i, dict if kind == "mapping" else object))
        for i, item in enumerate(table):  # pass 2: state, possibly referring to other objects
            state = item["state"]
            if not isinstance(state, dict):
                raise FormatError(f"{file}: object {i} of the whole-model file is malformed")
            where = f"<object {i}>"
            filled = {
                _name(k, file, where): self.decode(v, f"{where}.{k}") for k, v in state.items()
            }
            _fill(self.objects[i], filled, file, i)
            if "items" in item:
                items = item["items"]
                if not isinstance(items, list):
                    raise FormatError(f"{file}: object {i} of the whole-model file is malformed")
                dict.update(self.objects[i], (self._pair(p, where, 0) for p in items))

    def decode(self, node: Any, path: str, depth: int = 0) -> Any:
        if depth > MAX_DEPTH:
            raise FormatError(f"{self.file}: {path} is nested too deeply")
        if not isinstance(node, dict) or len(node) != 1:
            raise FormatError(f"{self.file}: attribute {path} is malformed")
        ((tag, payload),) = node.items()
        if tag == "plain":
            return payload
        if tag == "class":
            return self.resolve(payload, path, "class")
        if tag == "function":
            return self.functions(payload, self.file, path)
        if tag == "object":
            if type(payload) is not int or not 0 <= payload < len(self.objects):
                raise FormatError(f"{self.file}: {path} refers to no saved object")
            return self.objects[payload]
        if tag == "partial" and isinstance(payload, list) and len(payload) == 3:
            return self._partial(payload, path, depth)
        if tag == "module" and isinstance(payload, dict) and stateless(payload):
            return self.module(payload, path)
        if tag in _SEQUENCES and isinstance(payload, list):
            items = [self.decode(v, f"{path}[{i}]", depth + 1) for i, v in enumerate(payload)]
            return _SEQUENCES[tag](items)
        if tag == "dict" and isinstance(payload, list):
            return dict(self._pair(pair, path, depth) for pair in payload)
        raise FormatError(f"{self.file}: attribute {path} has an unknown kind {tag!r}")

    def _partial(self, payload: list, path: str, depth: int) -> functools.partial:
        """``functools.partial`` only stores ``func`` and the arguments; nothing is called."""
        func_node, args_node, keywords_node = payload
        if not (isinstance(func_node, dict) and set(func_node) <= {"class", "function"}):
            raise FormatError(f"{self.file}: {path}: a partial's function is malformed")
        func = self.decode(func_node, f"{path}.func", depth + 1)
        args = self.decode(args_node, f"{path}.args", depth + 1)
        keywords = self.decode(keywords_node, f"{path}.keywords", depth + 1)
        if not (type(args) is list and type(keywords) is dict):
            raise FormatError(f"{self.file}: {path}: a partial's arguments are malformed")
        if not all(type(k) is str and k.isidentifier() for k in keywords):
            raise FormatError(f"{self.file}: {path}: a partial's keyword names are malformed")
        return functools.partial(func, *args, **keywords)

    def _pair(self, pair: Any, path: str, depth: int) -> tuple:
        if not (isinstance(pair, list) and len(pair) == 2 and key_ok(pair[0])):
            raise FormatError(f"{self.file}: a dict entry of {path} is malformed")
        return pair[0], self.decode(pair[1], f"{path}[{pair[0]!r}]", depth + 1)


def key_ok(key: Any) -> bool:
    """Keys whose hashes a file cannot make collide (str hashing is randomized; small ints and
    bools hash to distinct values), so a crafted dict cannot make decoding quadratic."""
    if type(key) is int:
        return abs(key) < 2**61 - 1
    return type(key) in (str, bool, type(None))


def _bare(cls: type, file: str, index: int, base: type = object) -> Any:
    try:
        return base.__new__(cls)  # object.__new__ / dict.__new__: C code, nothing of cls runs
    except TypeError as exc:  # a builtin base (only reachable with trusted=True)
        raise FormatError(
            f"{file}: object {index} ({cls.__qualname__}) cannot be rebuilt from plain data ({exc})"
        ) from exc


def _fill(obj: Any, state: dict, file: str, index: int) -> None:
    try:
        object.__getattribute__(obj, "__dict__").update(state)
    except AttributeError as exc:  # no __dict__ (only reachable with trusted=True)
        raise FormatError(
            f"{file}: object {index} ({type(obj).__qualname__}) has no __dict__ to fill ({exc})"
        ) from exc


def _name(name: Any, file: str, path: str) -> str:
    if not isinstance(name, str) or not name.isidentifier() or name.startswith("__"):
        raise FormatError(f"{file}: {path}: attribute name {name!r} refused")
    return name


def class_kind_problem(cls: Any, kind: str) -> str | None:
    """Why an allowed class may not be used as ``kind`` (module, class, object, mapping)."""
    if kind == "module":
        return None if is_module_class(cls) else "is not an nn.Module subclass"
    if kind == "class":
        if is_module_class(cls) or data_class_problem(cls) is None:
            return None
        return "is neither an nn.Module subclass nor a plain data class"
    problem = data_class_problem(cls, dict if kind == "mapping" else object)
    return None if problem is None else f"cannot be rebuilt from plain data ({problem})"
