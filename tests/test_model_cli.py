"""CLI on legacy whole-model pickles (issue 21.3-4): ``--trusted`` imports the model's module
from the current directory as ``python -c`` would, the console script and ``python -m
torchkeep`` agree, a missing module is one line (no traceback), and conversion to safetensors
or torch.save writes the state dict and says the structure was dropped."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

import torchkeep
from torchkeep.cli.main import cli

MODEL_PY = """
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 2)
        self.bn = nn.BatchNorm1d(2)

    def forward(self, x):
        return self.bn(self.fc(x))
"""

SRC = os.path.dirname(os.path.dirname(os.path.abspath(torchkeep.__file__)))
#: The console script's situation: the current directory is not on sys.path (-P).
SCRIPT = [sys.executable, "-P", "-c", "import sys; from torchkeep.cli.main import main; main()"]
MODULE = [sys.executable, "-m", "torchkeep"]


@pytest.fixture
def project(tmp_path):
    """A directory with model.py and model.pth = torch.save(Net()), as a user has it."""
    (tmp_path / "model.py").write_text(MODEL_PY)
    sys.path.insert(0, str(tmp_path))
    try:
        import model

        torch.save(model.Net().eval(), tmp_path / "model.pth")
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("model", None)
    return tmp_path


def _run(cmd: list[str], cwd, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": SRC}
    env.pop("TORCHKEEP_DEBUG", None)
    return subprocess.run([*cmd, *args], cwd=cwd, env=env, capture_output=True, text=True)


@pytest.mark.parametrize("cmd", [SCRIPT, MODULE], ids=["script", "python-m"])
def test_trusted_convert_next_to_model_py(project, cmd) -> None:
    proc = _run(cmd, project, "convert", "model.pth", "model.tk", "--trusted")
    assert proc.returncode == 0, proc.stderr
    sys.path.insert(0, str(project))
    try:
        import model

        loaded = torchkeep.load_model(project / "model.tk")
        want = torch.load(project / "model.pth", weights_only=False)
        x = torch.randn(4, 3)
        assert type(loaded) is model.Net and torch.equal(loaded(x), want(x))
    finally:
        sys.path.remove(str(project))
        sys.modules.pop("model", None)


def test_untrusted_never_imports_from_cwd(project) -> None:
    """Without --trusted the pickle is refused (exit 4) and model.py is never imported."""
    (project / "model.py").write_text("open('IMPORTED', 'w')\n" + MODEL_PY)
    proc = _run(MODULE, project, "convert", "model.pth", "out.tk")  # cwd is on sys.path here
    assert proc.returncode == 4 and "Traceback" not in proc.stderr
    assert not (project / "IMPORTED").exists()


def test_missing_module_is_one_line(project) -> None:
    (project / "elsewhere").mkdir()
    proc = _run(SCRIPT, project / "elsewhere", "convert", "../model.pth", "m.tk", "--trusted")
    assert proc.returncode == 3
    assert "Traceback" not in proc.stderr and "'model'" in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("error:")


def test_help_says_trusted_imports_from_cwd() -> None:
    result = CliRunner().invoke(cli, ["convert", "--help"])
    assert result.exit_code == 0 and "current directory" in " ".join(result.output.split())


@pytest.mark.parametrize("name", ["model.safetensors", "model.pt"])
def test_whole_model_to_weights_formats(project, name) -> None:
    proc = _run(SCRIPT, project, "convert", "model.pth", name, "--trusted")
    assert proc.returncode == 0, proc.stderr
    assert "structure was dropped" in " ".join(proc.stderr.split())
    sys.path.insert(0, str(project))
    try:
        want = torch.load(project / "model.pth", weights_only=False).state_dict()
    finally:
        sys.path.remove(str(project))
        sys.modules.pop("model", None)
    if name.endswith(".safetensors"):
        got = load_file(project / name)
    else:
        got = torch.load(project / name, weights_only=True)
    assert set(got) == set(want)
    for key in want:
        assert torch.equal(got[key], want[key]), key
