"""What a class may do while torchkeep rebuilds an instance of it, read without running it.

Everything here inspects classes through their ``__dict__`` entries only (``vars``), never
through attribute access on the class, so no descriptor, ``__getattr__``, metaclass hook or
``classproperty`` of a class named by a file runs while deciding about it.

Two kinds of classes are rebuilt from plain data:

* **module classes** (``nn.Module`` subclasses): made with ``object.__new__`` and filled through
  torch's ``__setstate__``; a ``__new__``, ``__setstate__``, ``__del__`` or ``__getattribute__``
  defined outside torch would run user code with state from the file, so such classes need
  ``trusted=True``;
* **data classes** (configuration objects: Hugging Face ``PretrainedConfig``, dataclasses, simple
  attribute bags): made with ``object.__new__`` and filled by updating ``__dict__``; no
  ``__init__``/``__post_init__``/``__setattr__`` runs. Allowed only when the class is a plain
  Python class whose instances keep their state in ``__dict__`` (no ``__slots__``, no builtin
  base, no ``__new__``/``__del__``/``__setstate__``/``__getstate__``/``__reduce__`` of its own).
"""

from __future__ import annotations

import abc
from typing import Any

from torch import nn

#: Metaclasses whose class-level lookups run no user code.
PLAIN_METACLASSES = (type, abc.ABCMeta)
#: Special methods that would run user code while (or after) rebuilding a module instance
#: (``__getattribute__`` runs on every attribute access, torch's own ``__setstate__`` included).
MODULE_HOOKS = ("__new__", "__setstate__", "__del__", "__getattribute__")
#: ... and a configuration object's: those plus its own pickling protocol.
DATA_HOOKS = ("__new__", "__setstate__", "__del__", "__getstate__", "__reduce__", "__reduce_ex__")
_HEAPTYPE = 1 << 9  # Py_TPFLAGS_HEAPTYPE: a class defined by a ``class`` statement


def mro(cls: type) -> tuple[type, ...]:
    """``cls.__mro__`` read through ``type``'s own descriptor (no metaclass code runs)."""
    return type.__dict__["__mro__"].__get__(cls)


def is_torch_class(cls: type) -> bool:
    """Defined by torch itself (its special methods are torch's, not the file's choice)."""
    module = vars(cls).get("__module__")
    return isinstance(module, str) and (module == "torch" or module.startswith("torch."))


def static_lookup(cls: type, name: str) -> tuple[type | None, Any]:
    """(defining class, raw value) of ``name`` along the MRO, without descriptors."""
    for klass in mro(cls):
        if name in vars(klass):
            return klass, vars(klass)[name]
    return None, None


def is_builtin(cls: type) -> bool:
    """A type implemented in C (``object``, ``dict``...): its methods are not user code."""
    return not type.__dict__["__flags__"].__get__(cls) & _HEAPTYPE


def user_hooks(cls: type, names: tuple[str, ...]) -> list[str]:
    """Which of ``names`` a Python class outside torch defines for ``cls`` (builtins' are C)."""
    found = []
    for name in names:
        owner, _ = static_lookup(cls, name)
        if owner is not None and not is_builtin(owner) and not is_torch_class(owner):
            found.append(f"{owner.__qualname__}.{name}")
    return found


def plain_metaclass(cls: type) -> bool:
    meta = type(cls)
    return meta in PLAIN_METACLASSES or is_torch_class(meta)


def is_module_class(cls: Any) -> bool:
    return isinstance(cls, type) and plain_metaclass(cls) and nn.Module in mro(cls)


def data_class_problem(cls: Any, base: type = object) -> str | None:
    """Why instances of ``cls`` cannot be stored/rebuilt as plain data; None when they can.

    ``base=dict``: a ``dict`` subclass (Lightning's ``AttributeDict``), rebuilt with
    ``dict.__new__`` and ``dict.update``, whose items and ``__dict__`` are plain data.
    """
    if not isinstance(cls, type):
        return "it is not a class"
    if not plain_metaclass(cls):
        return "its class has a metaclass of its own"
    classes = mro(cls)
    if nn.Module in classes:
        return "it is a module stored outside _modules; assign it as a submodule"
    if base is not object and (len(classes) < 3 or classes[-2] is not base):
        return f"it is not a {base.__qualname__} subclass"
    for klass in classes[: -1 if base is object else -2]:
        if is_builtin(klass):
            return f"it derives from the builtin type {klass.__qualname__}"
        if vars(klass).get("__slots__") not in (None, (), []):
            return f"{klass.__qualname__} keeps its state in __slots__"
    hooks = user_hooks(cls, DATA_HOOKS)
    if hooks:
        return f"{', '.join(hooks)} would have to run to rebuild it"
    return None
