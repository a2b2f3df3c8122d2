"""References a whole-model file stores instead of code: classes and functions by name, plain data.

Shared by :mod:`.capture` (what may be saved) and :mod:`.rebuild` (what a reference may resolve
to). Nothing here imports or calls anything named by a file.
"""

from __future__ import annotations

import operator
import sys
import types
from collections import OrderedDict
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UnsupportedValueError

#: Namespaces whose functions may be referenced by name (resolved without importing anything).
FUNCTION_NAMESPACES = (("torch.nn.functional", F), ("torch", torch), ("operator", operator))
_SCALARS = (type(None), bool, int, float, str, bytes, complex, torch.dtype, torch.device)


#: Suffix of a reference to "the class of this module-level object" (``module:name@type``).
TYPE_OF = "@type"


def _instance_of(cls: type) -> str | None:
    """``module:name@type`` when a public module-level object is an instance of ``cls``.

    Covers a class made inside a factory whose instance its module keeps, e.g. the ``kernels``
    package's function wrappers (``apply_rotary_pos_emb``) that Hugging Face attention layers
    copy into ``_kernel_funcs``; it is how that package's own pickling finds the class.
    """
    module = sys.modules.get(cls.__module__) if isinstance(cls.__module__, str) else None
    for name, obj in (vars(module) if module is not None else {}).items():
        if type(obj) is cls and name.isidentifier() and not name.startswith("_"):
            return f"{cls.__module__}:{name}{TYPE_OF}"
    return None


def class_path(cls: type, where: str = "<root>") -> str:
    """``module:qualname`` of a class; refuses classes that cannot be found again by name."""
    qual = cls.__qualname__
    found_as = _instance_of(cls) if "<locals>" in qual else None
    if found_as is not None:
        return found_as
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
        "bools, None, dtypes, devices, tensors and tuples/lists/dicts of them, classes, "
        "configuration objects whose state is such data, and functions of "
        "torch.nn.functional/torch/operator); remove the attribute, make it plain data, or save "
        "the state_dict instead"
    )
