"""The documentation site's docstring check (docs/hooks/check_docstrings.py), which `make lint`
runs through `mkdocs build --strict`: it must flag an undocumented public object."""

from __future__ import annotations

import importlib.util
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
            "fakepkg.__all__ names missing, which fakepkg does not define",
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
