"""Benchmark workloads: the model (load target) and the object to save, built fast and seeded.

Tensors are filled by copying from a 64 MB pool of random numbers at varying offsets: every
byte is "random" as far as disks and hashes care (nothing here compresses or deduplicates),
and building 1.2 GB costs a memcpy rather than seconds of random number generation.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

MB = 1 << 20
_POOL_ELEMS = 16 * MB  # 64 MB of float32


class _Filler:
    def __init__(self, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.pool = torch.randn(_POOL_ELEMS, generator=g)
        self.cursor = 0

    def fill(self, t: torch.Tensor) -> None:
        flat = t.detach().view(-1)  # every workload tensor is float32
        done = 0
        while done < flat.numel():
            start = self.cursor % (_POOL_ELEMS - 1)
            n = min(flat.numel() - done, _POOL_ELEMS - start)
            flat[done : done + n].copy_(self.pool[start : start + n])
            done += n
            self.cursor += 7919 * (n % 13 + 1)


class Block(nn.Module):
    """One transformer block's weights: attention projections, MLP, norm."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.q = nn.Linear(d, d, bias=False, device="meta")
        self.k = nn.Linear(d, d, bias=False, device="meta")
        self.v = nn.Linear(d, d, bias=False, device="meta")
        self.o = nn.Linear(d, d, bias=False, device="meta")
        self.up = nn.Linear(d, 4 * d, bias=False, device="meta")
        self.down = nn.Linear(4 * d, d, bias=False, device="meta")
        self.norm = nn.LayerNorm(d, elementwise_affine=True, bias=False, device="meta")


class LLM(nn.Module):
    """24 blocks of d=1024 plus embedding and final norm: ~1.2 GB fp32 in 170 tensors."""

    def __init__(self, layers: int = 24, d: int = 1024, vocab: int = 16384) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d, device="meta")
        self.blocks = nn.ModuleList(Block(d) for _ in range(layers))
        self.norm = nn.LayerNorm(d, bias=False, device="meta")


class Flat(nn.Module):
    """A module holding the given named tensors as buffers (many-small, one-huge)."""

    def __init__(self, shapes: dict[str, tuple[int, ...]]) -> None:
        super().__init__()
        for name, shape in shapes.items():
            self.register_buffer(name, torch.empty(shape, device="meta"))


def _materialize(model: nn.Module, fill: bool, seed: int) -> nn.Module:
    model = model.to_empty(device="cpu")
    if fill:
        filler = _Filler(seed)
        with torch.no_grad():
            for t in model.state_dict().values():
                filler.fill(t)
    return model


def llm_layers_for(nbytes: int) -> int:
    """Blocks of d=1024 (48 MB each) giving about ``nbytes`` with the 64 MB embedding."""
    return max(0, round((nbytes - 64 * MB) / (48 * MB + 4096)))


def build_model(workload: str, size: int, fill: bool, seed: int = 0) -> nn.Module:
    """The module a workload saves from (``fill=True``) or loads into (``fill=False``)."""
    if workload in ("llm", "optim"):  # ``size`` shrinks it for --quick runs
        return _materialize(LLM(layers=llm_layers_for(size) if size else 24), fill, seed)
    if workload == "scale":
        layers = llm_layers_for(size)
        if layers == 0:  # below one block: a narrower embedding-only model
            return _materialize(LLM(layers=0, vocab=max(1, size // 4096)), fill, seed)
        return _materialize(LLM(layers=layers), fill, seed)
    if workload == "small":
        g = torch.Generator().manual_seed(seed)
        sizes = torch.randint(256, 1025, (20_000,), generator=g).tolist()  # 1-4 KB of fp32
        return _materialize(Flat({f"t{i}": (n,) for i, n in enumerate(sizes)}), fill, seed)
    if workload == "huge":
        elems = size // 4 if size else 256 * MB  # 1 GiB of fp32 by default
        return _materialize(Flat({"weight": (elems,)}), fill, seed)
    raise ValueError(f"unknown workload {workload!r}")


def add_optimizer(model: nn.Module, seed: int = 1) -> dict[str, Any]:
    """A checkpoint dict with AdamW state (exp_avg, exp_avg_sq per parameter) filled in."""
    params = [p for p in model.parameters()]
    opt = torch.optim.AdamW(params, lr=1e-4)
    for p in params:
        opt.state[p] = {
            "step": torch.tensor(10.0),
            "exp_avg": torch.empty_like(p),
            "exp_avg_sq": torch.empty_like(p),
        }
    filler = _Filler(seed)
    with torch.no_grad():
        for state in opt.state.values():
            filler.fill(state["exp_avg"])
            filler.fill(state["exp_avg_sq"])
            state["exp_avg_sq"].abs_()
    return {"model": model.state_dict(), "optimizer": opt.state_dict()}


def checkpoint_bytes(obj: Any) -> int:
    """Tensor bytes in ``obj`` (what every contender must write)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(checkpoint_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(checkpoint_bytes(v) for v in obj)
    return 0


def flatten(obj: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """Flat name -> tensor dict (for safetensors, which takes nothing else)."""
    out: dict[str, torch.Tensor] = {}
    if isinstance(obj, torch.Tensor):
        out[prefix] = obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            out.update(flatten(v, f"{prefix}.{i}" if prefix else str(i)))
    return out
