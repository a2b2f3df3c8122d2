"""Capture and restore every random number generator a training step may draw from.

Python ``random``, NumPy's global generator, torch's CPU generator and, when CUDA has been
initialised, every CUDA device's generator. States are stored as plain ints and tensors so
they go through the safe typed tree (no pickle).
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

from ..errors import StateDictMismatchError


def capture_rng() -> dict[str, Any]:
    """The current state of every generator, as a tree of ints, floats and tensors."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": {
            "version": version,
            "state": torch.tensor(internal, dtype=torch.int64),
            "gauss": gauss,
        },
        "numpy": {
            "name": name,
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def restore_rng(state: dict[str, Any], where: str = "rng") -> None:
    """Put every generator back to ``state`` (as returned by :func:`capture_rng`)."""
    try:
        py = state["python"]
        internal = tuple(int(x) for x in py["state"].tolist())
        random.setstate((py["version"], internal, py["gauss"]))
        npy = state["numpy"]
        keys = np.asarray(npy["keys"].numpy(), dtype=np.uint32)
        np.random.set_state((npy["name"], keys, npy["pos"], npy["has_gauss"], npy["cached"]))
        torch.set_rng_state(state["torch"].to("cpu", torch.uint8))
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as exc:
        raise StateDictMismatchError(
            f"{where}: the saved RNG state is malformed ({exc}); pass rng=False to skip it"
        ) from exc
    _restore_cuda(state.get("cuda"), where)


def _restore_cuda(saved: list | None, where: str) -> None:
    if not saved:
        return
    if not torch.cuda.is_available():
        return  # saved on a GPU machine, resumed on CPU: CUDA streams cannot be reproduced here
    count = torch.cuda.device_count()
    if len(saved) != count:
        raise StateDictMismatchError(
            f"{where}.cuda: the checkpoint holds RNG state for {len(saved)} CUDA devices but "
            f"{count} are visible; make the same devices visible or pass rng=False"
        )
    torch.cuda.set_rng_state_all([t.to("cpu", torch.uint8) for t in saved])
