"""MkDocs hooks for the torchkeep site (mkdocs.yml ``hooks:``).

* Every public object of the API (``torchkeep.__all__``) and every public method, property and
  module-level function of those objects must have a docstring: a missing one is logged as a
  warning, which ``mkdocs build --strict`` (``make lint``) turns into a failure. mkdocstrings
  itself only hides undocumented objects, so without this check they would vanish silently.
* The docstrings use Sphinx roles (``:class:`X```); the rendered pages show them as code.
* A guide added to ``docs/`` without a ``nav`` entry in mkdocs.yml is listed under "Guides"
  (titled by its first heading) instead of being left out of the navigation.
* The commands' ``Examples:`` blocks (click's ``\\b`` paragraphs, whose line breaks
  mkdocs-click keeps but Markdown joins) are shown as code blocks in the CLI reference.
"""

from __future__ import annotations

import importlib
import logging
import os
import re
from typing import Any

import griffe

log = logging.getLogger("mkdocs.hooks.check_docstrings")

_ROLE = re.compile(r":(?:class|func|meth|exc|attr|mod|data|obj):(<code>)")
_EXAMPLES = re.compile(r"<p>(Examples?:)\n((?:  [^\n<]*(?:\n|(?=</p>)))+)</p>")


def _missing(obj: Any, path: str) -> list[str]:
    """Public objects under ``obj`` (itself included) that have no docstring. A method that
    overrides a documented method of a base class (a ``torch.distributed.checkpoint`` or
    Lightning hook) inherits that docstring, as ``inspect.getdoc`` does."""
    missing = [] if obj.docstring and obj.docstring.value.strip() else [path]
    if obj.is_class:
        for name, member in obj.members.items():
            if name.startswith("_") or member.is_alias or member.is_attribute:
                continue  # attributes are documented in the class docstring
            if member.is_function and _base_documents(obj.path, name):
                continue
            if member.is_function or member.is_class:
                missing += _missing(member, f"{path}.{name}")
    return missing


def _base_documents(class_path: str, name: str) -> bool:
    """Whether a base class of ``class_path`` (imported to see its real bases) documents
    ``name``. Only asked about methods without a docstring of their own."""
    module_name, _, class_name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError):
        return False  # an optional framework that is not installed: no inherited docstrings
    return any(
        name in vars(base) and (getattr(vars(base)[name], "__doc__", None) or "").strip()
        for base in cls.__mro__[1:]
    )


#: Documented objects outside ``__all__`` (returned by the public API) held to the same rule.
EXTRA = {
    "torchkeep": [
        "transfer.reader.FileReader",
        "integrations.lightning.TorchkeepCheckpointIO",
        "integrations.transformers.TorchkeepTrainer",
        "integrations.transformers.TorchkeepTrainerMixin",
        "integrations.transformers.torchkeep_trainer",
        "integrations.accelerate.save_state",
        "integrations.accelerate.load_state",
        "integrations.accelerate.training_state",
    ]
}


#: Sub-packages whose ``__all__`` is public API too (documented on their own pages).
SUBPACKAGES = {"torchkeep": ["distributed"]}


def _exported(module: Any) -> list[str]:
    exported = module.members.get("__all__")
    return [str(n).strip("'\"") for n in getattr(exported and exported.value, "elements", [])]


def problems(src: str, package: str = "torchkeep") -> list[str]:
    """One line per public object of ``package`` (under ``src``) that lacks a docstring."""
    loaded = griffe.load(package, search_paths=[src], resolve_aliases=True)
    names = _exported(loaded)
    if not names:
        return [f"{package}.__all__ could not be read: the docstring check did not run"]
    names += EXTRA.get(package, [])
    for sub in SUBPACKAGES.get(package, []):
        module = _get(loaded, sub)
        if module is None or not _exported(module):
            return [f"{package}.{sub}.__all__ could not be read: the docstring check did not run"]
        names += [f"{sub}.{name}" for name in _exported(module)]
    out = []
    for name in names:
        member = loaded.members.get(name) if "." not in name else _get(loaded, name)
        if member is None:
            out.append(f"{package} has no {name}, which its API lists")
            continue
        target = member.final_target if member.is_alias else member
        out += [
            f"public API object {p} has no docstring" for p in _missing(target, f"{package}.{name}")
        ]
    return out


def _get(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = obj.members.get(part) if obj is not None else None
    return obj


def _nav_files(nav: Any) -> set[str]:
    if isinstance(nav, str):
        return {nav}
    if isinstance(nav, dict):
        return set().union(*(_nav_files(v) for v in nav.values()))
    if isinstance(nav, list):
        return set().union(*(_nav_files(v) for v in nav))
    return set()


def _title(path: str) -> str:
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if line.startswith("#"):
                return line.lstrip("#").strip().strip("`")
    return os.path.splitext(os.path.basename(path))[0]


def on_config(config: Any) -> Any:
    """Append the guides ``nav`` does not name to its "Guides" section."""
    nav = config["nav"] or []
    guides = next((e["Guides"] for e in nav if isinstance(e, dict) and "Guides" in e), None)
    if guides is None:
        return config
    listed = _nav_files(nav)
    for name in sorted(os.listdir(config["docs_dir"])):
        path = os.path.join(config["docs_dir"], name)
        if name.endswith(".md") and name not in listed and os.path.isfile(path):
            guides.append({_title(path): name})
    return config


def on_pre_build(config: Any) -> None:
    """Warn (an error under --strict) for each public API object without a docstring."""
    for line in problems(os.path.join(os.path.dirname(config["config_file_path"]), "src")):
        log.warning(line)


def _examples(match: re.Match[str]) -> str:
    lines = "\n".join(line[2:] for line in match.group(2).rstrip("\n").split("\n"))
    return f"<p>{match.group(1)}</p>\n<pre><code>{lines}</code></pre>"


def on_page_content(html: str, **_: Any) -> str:
    """Roles as plain code; command examples as code blocks."""
    return _EXAMPLES.sub(_examples, _ROLE.sub(r"\1", html))
