"""The package as users get it: wheel and sdist built, installed into a fresh venv, used.

The fresh venv sees the running interpreter's site-packages through a ``.pth`` file (torch and
the other dependencies are not reinstalled; ``.pth`` files in those directories, such as an
editable install of torchkeep, are not processed), and the wheel goes in with ``--no-deps``.
The test then checks that the installed copy is the one imported, not the source tree.
"""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

ROUND_TRIP = """
import pathlib, sys
import torch, torchkeep
from torchkeep.transfer import memcopy

here = pathlib.Path(torchkeep.__file__).resolve()
assert here.is_relative_to(pathlib.Path(sys.prefix).resolve()), f"imported from {here}"
model = torch.nn.Linear(4, 3)
torchkeep.save(model.state_dict(), "w.tk")
assert torchkeep.verify("w.tk") == []
fresh = torch.nn.Linear(4, 3)
report = torchkeep.load_state_dict(fresh, "w.tk")
assert report.ok and torch.equal(fresh.weight, model.weight), report
state = {"w": torch.arange(1 << 20, dtype=torch.float32), "step": 7}
torchkeep.save_async(state, "a.tk").wait()  # the snapshot copy: C extension or numpy
back = torchkeep.load("a.tk")
assert back["step"] == 7 and torch.equal(back["w"], state["w"])
print("extension", memcopy._streamcopy is not None)
"""


def _clean_env() -> dict[str, str]:
    """The environment minus PYTHONPATH: the fresh venv must not see the source tree (whose
    ``src/torchkeep.egg-info`` pip would take for an installed torchkeep)."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}


USER_CODE = """
import torch
import torchkeep

model = torch.nn.Linear(2, 2)
torchkeep.save(model.state_dict(), "m.tk")
report: torchkeep.LoadReport = torchkeep.load_state_dict(model, "m.tk")
with torchkeep.CheckpointManager("run", keep_last=2) as manager:
    step: int | None = manager.restore({"model": model})
corrupt: int = torchkeep.verify("m.tk")  # wrong on purpose: verify returns list[str]
"""


def _build(out: Path, *what: str, compiler: bool) -> str:
    env = dict(os.environ)
    if not compiler:
        env["CC"] = "false"  # what a machine without a C compiler does: the extension is skipped
    cmd = [sys.executable, "-m", "build", "--no-isolation", *what, "--outdir", str(out), str(ROOT)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout + done.stderr


def _fresh_venv(where: Path, dist: Path) -> Path:
    """A venv without pip holding ``dist`` (a wheel), then given sight of this interpreter's
    installed packages (appended, so the venv's own torchkeep comes first). The wheel goes in
    before the ``.pth`` exists: pip then cannot see, let alone touch, the dev install."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(where)], check=True)
    python = where / "bin" / "python"
    cmd = [sys.executable, "-m", "pip", "--python", str(python), "install", "-q"]
    done = subprocess.run(
        [*cmd, "--no-deps", "--no-index", str(dist)],
        env=_clean_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        env=_clean_env(),
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    assert list(Path(purelib).glob("torchkeep-*.dist-info")), "the wheel was not installed"
    ours = [*site.getsitepackages(), sysconfig.get_paths()["purelib"]]
    ours += [sysconfig.get_paths()["platlib"]]
    lines = dict.fromkeys(p for p in ours if os.path.isdir(p) and p != purelib)
    Path(purelib, "_torchkeep_test_deps.pth").write_text("\n".join(lines) + "\n")
    return python


def _run(python: Path, *args: str, cwd: Path) -> str:
    done = subprocess.run(
        [str(python), *args], cwd=cwd, env=_clean_env(), capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, f"{args}: {done.stdout[-2000:]}{done.stderr[-2000:]}"
    return done.stdout


def _smoke(python: Path, tmp_path: Path, extension: bool) -> str:
    """``torchkeep --help``, ``python -m torchkeep --version`` and a save/load round trip
    (whose snapshot copy ran with the C extension if and only if ``extension``)."""
    script = python.parent / "torchkeep"
    assert "inspect" in _run(script, "--help", cwd=tmp_path)
    version = _run(python, "-m", "torchkeep", "--version", cwd=tmp_path)
    assert version.startswith("torchkeep "), version
    assert f"extension {extension}" in _run(python, "-c", ROUND_TRIP, cwd=tmp_path)
    return version


def test_wheel_without_compiler_installs_and_says_so(tmp_path: Path) -> None:
    """A wheel built where no C compiler works installs, runs on numpy's copy, and tells."""
    dist = tmp_path / "dist"
    log = _build(dist, compiler=False)  # the sdist, then the wheel from it (not the tree)
    assert "optional C extension torchkeep._streamcopy was not built" in log
    (wheel,) = dist.glob("torchkeep-*.whl")
    assert [p.name for p in dist.glob("torchkeep-*.tar.gz")], "no sdist"
    names = zipfile.ZipFile(wheel).namelist()
    assert "torchkeep/py.typed" in names and "torchkeep/__main__.py" in names
    assert not [n for n in names if n.endswith((".so", ".pyd", ".c"))], names
    python = _fresh_venv(tmp_path / "venv", wheel)
    version = _smoke(python, tmp_path, extension=False)
    assert "not built; snapshots copy with numpy" in version, version
    from torchkeep import __version__

    assert version.splitlines()[0] == f"torchkeep {__version__}"


@pytest.mark.long
@pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler")
def test_sdist_builds_the_extension_and_installs(tmp_path: Path) -> None:
    """The sdist carries the C source; installed where a compiler works, the extension is
    built, used by the round trip, and reported by ``--version``."""
    dist = tmp_path / "dist"
    _build(dist, "--sdist", compiler=True)
    (sdist,) = dist.glob("torchkeep-*.tar.gz")
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"]
        + ["--wheel-dir", str(tmp_path / "wheels"), str(sdist)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (wheel,) = (tmp_path / "wheels").glob("torchkeep-*.whl")
    assert [n for n in zipfile.ZipFile(wheel).namelist() if n.endswith(".so")]
    python = _fresh_venv(tmp_path / "venv", wheel)
    version = _smoke(python, tmp_path, extension=True)
    assert "streaming-copy C extension: built" in version, version


@pytest.mark.long
def test_installed_package_is_typed(tmp_path: Path) -> None:
    """With the wheel installed, a user's mypy --strict reads torchkeep's annotations
    (``py.typed``): it accepts correct use and reports the one wrong annotation."""
    pytest.importorskip("mypy")
    dist = tmp_path / "dist"
    _build(dist, compiler=False)
    (wheel,) = dist.glob("torchkeep-*.whl")
    python = _fresh_venv(tmp_path / "venv", wheel)
    (tmp_path / "user_code.py").write_text(USER_CODE)
    cmd = [str(python), "-m", "mypy", "--strict", "--cache-dir", str(tmp_path / "cache")]
    done = subprocess.run(
        [*cmd, "user_code.py"], cwd=tmp_path, env=_clean_env(), capture_output=True, text=True
    )
    lines = [line for line in done.stdout.splitlines() if ": error:" in line]
    assert len(lines) == 1 and "user_code.py:10:" in lines[0], done.stdout + done.stderr
    assert 'expression has type "list[str]", variable has type "int"' in lines[0]
