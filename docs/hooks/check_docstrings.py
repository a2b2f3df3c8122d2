"""MkDocs hooks for the torchkeep site (mkdocs.yml ``hooks:``).

* Every public object of the API (``torchkeep.__all__``) and every public method, property and
  module-level function of those objects must have a docstring: a missing one is logged as a
  warning, which ``mkdocs build --strict`` (``make lint``) turns into a failure. mkdocstrings
  itself only hides undocumented objects, so without this check they would vanish silently.
* The docstrings use Sphinx roles (``:class:`X```); the rendered pages show them as code.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any

import griffe

log = logging.getLogger("mkdocs.hooks.check_docstrings")

_ROLE = re.compile(r":(?:class|func|meth|exc|attr|mod|data|obj):(<code>)")


def _missing(obj: Any, path: str) -> list[str]:
    """Public objects under ``obj`` (itself included) that have no docstring."""
    missing = [] if obj.docstring and obj.docstring.value.strip() else [path]
    if obj.is_class:
        for name, member in obj.members.items():
            if name.startswith("_") or member.is_alias or member.is_attribute:
                continue  # attributes are documented in the class docstring
            if member.is_function or member.is_class:
                missing += _missing(member, f"{path}.{name}")
    return missing


def on_pre_build(config: Any) -> None:
    """Warn (an error under --strict) for each public API object without a docstring."""
    src = os.path.join(os.path.dirname(config["config_file_path"]), "src")
    package = griffe.load("torchkeep", search_paths=[src], resolve_aliases=True)
    exported = package.members["__all__"].value
    names = [str(n).strip("'\"") for n in getattr(exported, "elements", [])]
    if not names:
        log.warning("torchkeep.__all__ could not be read: the docstring check did not run")
    for name in names:
        member = package.members.get(name)
        if member is None:
            log.warning("torchkeep.__all__ names %s, which torchkeep does not define", name)
            continue
        target = member.final_target if member.is_alias else member
        for path in _missing(target, f"torchkeep.{name}"):
            log.warning("public API object %s has no docstring", path)


def on_page_content(html: str, **_: Any) -> str:
    """Render ``:class:`X```-style roles of the docstrings as plain code."""
    return _ROLE.sub(r"\1", html)
