"""Shared helpers for the whole-model tests: a user-model module written to disk, fresh processes.

The model classes live in a module (``tkzoo``) written into a temporary directory, so a fresh
process can import it (like the seed's ``from model import Model``) or deliberately not.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

ZOO_SOURCE = textwrap.dedent(
    '''
    import torch
    import torch.nn.functional as F
    from torch import nn


    class Model(nn.Module):
        """The seed's model: one nn.Linear, constructor argument not stored."""

        def __init__(self, n_input_features):
            super().__init__()
            self.linear = nn.Linear(n_input_features, 1)

        def forward(self, x):
            return torch.sigmoid(self.linear(x))


    class Block(nn.Module):
        def __init__(self, dim, act=F.gelu):
            super().__init__()
            self.dim = dim
            self.proj = nn.Linear(dim, dim)
            self.norm = nn.LayerNorm(dim)
            self.act = act
            self.scale = 0.5
            self.register_buffer("offset", torch.randn(dim))
            self.register_buffer("cache", torch.zeros(dim), persistent=False)

        def forward(self, x):
            return self.norm(self.act(self.proj(x)) * self.scale + self.offset + self.cache)


    class Net(nn.Module):
        """Nested custom modules, ModuleList/ModuleDict, tied weights, plain config."""

        def __init__(self, vocab=11, dim=8):
            super().__init__()
            self.vocab, self.dim = vocab, dim
            self.emb = nn.Embedding(vocab, dim)
            self.blocks = nn.ModuleList([Block(dim), Block(dim, act=torch.tanh)])
            self.heads = nn.ModuleDict({"lm": nn.Linear(dim, vocab, bias=False)})
            self.heads["lm"].weight = self.emb.weight
            self.config = {"name": "net", "sizes": (vocab, dim), "dtype": torch.float32}

        def forward(self, idx):
            x = self.emb(idx)
            for block in self.blocks:
                x = block(x)
            return self.heads["lm"](x)


    def build(kind):
        """(model, example input) of each kind, deterministic; BatchNorm has running stats."""
        torch.manual_seed(0)
        if kind == "seed":
            return Model(n_input_features=6), torch.randn(4, 6)
        if kind == "sequential":
            model = nn.Sequential(
                nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                nn.Linear(4 * 6 * 6, 5), nn.LayerNorm(5), nn.Dropout(0.2), nn.Tanh(),
            )
            x = torch.randn(2, 3, 8, 8)
            model(x)  # training step: BatchNorm running statistics move
            return model, x
        if kind == "transformer":
            layer = nn.TransformerEncoderLayer(8, 2, 16, batch_first=True, dropout=0.0)
            return nn.TransformerEncoder(layer, 2, enable_nested_tensor=False), torch.randn(2, 5, 8)
        if kind == "attention":
            return nn.MultiheadAttention(8, 2, batch_first=True), torch.randn(2, 5, 8)
        if kind == "net":
            return Net(), torch.randint(0, 11, (2, 7))
        if kind == "recurrent":
            return nn.LSTM(4, 5, 2, batch_first=True, bidirectional=True), torch.randn(2, 3, 4)
        raise ValueError(kind)


    def run(model, x):
        if isinstance(model, nn.MultiheadAttention):
            return model(x, x, x)[0]
        if isinstance(model, nn.RNNBase):
            return model(x)[0]
        return model(x)


    KINDS = ["seed", "sequential", "transformer", "attention", "net", "recurrent"]
    '''
)


@pytest.fixture
def zoo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The ``tkzoo`` module, importable in this process and in fresh ones (via PYTHONPATH)."""
    pkg = tmp_path / "zoo"
    pkg.mkdir()
    (pkg / "tkzoo.py").write_text(ZOO_SOURCE)
    monkeypatch.syspath_prepend(str(pkg))
    sys.modules.pop("tkzoo", None)
    import tkzoo

    yield tkzoo
    sys.modules.pop("tkzoo", None)


def run_fresh(script: str, *paths: Path, timeout: int = 120) -> dict:
    """Run ``script`` in a fresh interpreter; it prints one JSON line, returned as a dict."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), *map(str, paths)])
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=str(paths[0] if paths else ROOT),
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_zoo_models_run(zoo) -> None:
    for kind in zoo.KINDS:
        model, x = zoo.build(kind)
        assert zoo.run(model.eval(), x).isfinite().all()
