"""The documentation site's docstring check (docs/hooks/check_docstrings.py), which `make lint`
runs through `mkdocs build --strict`: it must flag an undocumented public object."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _hook():
    spec = importlib.util.spec_from_file_location(
        "check_docstrings", ROOT / "docs/hooks/check_docstrings.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_undocumented_public_objects_are_flagged(tmp_path: Path) -> None:
    pkg = tmp_path / "fakepkg"
    pkg.mkdir()
    (pkg / "impl.py").write_text(
        'def good():\n    """Documented."""\n\n\ndef bad():\n    pass\n\n\n'
        'class Klass:\n    """Documented."""\n\n    def method(self):\n        pass\n\n'
        "    def _private(self):\n        pass\n"
    )
    (pkg / "__init__.py").write_text(
        '"""Fake."""\nfrom .impl import Klass, bad, good\n\n'
        '__all__ = ["good", "bad", "Klass", "missing"]\n'
    )
    found = _hook().problems(str(tmp_path), "fakepkg")
    assert sorted(found) == sorted(
        [
            "public API object fakepkg.bad has no docstring",
            "public API object fakepkg.Klass.method has no docstring",
            "fakepkg has no missing, which its API lists",
        ]
    )


def test_torchkeep_public_api_is_documented() -> None:
    assert _hook().problems(str(ROOT / "src")) == []


def test_guides_missing_from_nav_are_listed(tmp_path: Path) -> None:
    (tmp_path / "index.md").write_text("# Home\n")
    (tmp_path / "remote.md").write_text("intro\n\n# Remote storage\n")
    nav = [{"Home": "index.md"}, {"Guides": [{"Old": "old.md"}]}]
    config = _hook().on_config({"nav": nav, "docs_dir": str(tmp_path)})
    assert config["nav"][1]["Guides"] == [{"Old": "old.md"}, {"Remote storage": "remote.md"}]


def _lint_mkdocs_command() -> list[str]:
    """The ``mkdocs build`` line of ``make lint``, as an argv for this interpreter."""
    makefile = (ROOT / "Makefile").read_text()
    recipe = makefile.split("\nlint:", 1)[1].split("\n\n", 1)[0]
    (line,) = [ln for ln in recipe.splitlines() if "mkdocs build" in ln]
    words = line.split("#", 1)[0].split()
    start = words.index("$(PY)")
    return [sys.executable, *words[start + 1 :]]


def test_lint_docs_build_fails_on_a_broken_link(tmp_path: Path) -> None:
    """`make lint`'s docs build really is strict: a page linking to a missing page fails it."""
    shutil.copytree(ROOT / "docs", tmp_path / "docs")
    shutil.copy(ROOT / "mkdocs.yml", tmp_path)
    shutil.copy(ROOT / "CHANGELOG.md", tmp_path)
    (tmp_path / "src").symlink_to(ROOT / "src")
    (tmp_path / "docs" / "getting-started.md").open("a").write("\n[gone](no-such-page.md)\n")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run(
        _lint_mkdocs_command(), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode != 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "no-such-page.md" in done.stdout + done.stderr
