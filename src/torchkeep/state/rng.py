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

_PY_WORDS = 625  # random.getstate(): 624 Mersenne Twister words and the position
_NP_WORDS = 624  # np.random.get_state(): the MT19937 key
_MAX_CUDA_DEVICES = 1024


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
    prepare_rng(state, where).apply()


class PreparedRng:
    """RNG states checked and converted, ready to apply without any further failure.

    :func:`prepare_rng` does every check a restore could fail on (types, sizes, values the
    generators reject), so that a caller can validate before it changes anything else.
    """

    def __init__(self, python: tuple, numpy: tuple, cpu: torch.Tensor, cuda: list) -> None:
        self.python, self.numpy, self.cpu, self.cuda = python, numpy, cpu, cuda

    def apply(self) -> None:
        """Set every generator (nothing here can fail on a prepared state)."""
        random.setstate(self.python)
        np.random.set_state(self.numpy)
        torch.set_rng_state(self.cpu)
        if self.cuda:
            torch.cuda.set_rng_state_all(self.cuda)


def prepare_rng(state: Any, where: str = "rng") -> PreparedRng:
    """Validate a saved RNG state and convert it; raises before any generator changes.

    Sizes are checked before any tensor is expanded (a forged state may be a huge stride-0
    view); each generator then accepts the state in a trial set that is undone at once.
    """
    try:
        if not isinstance(state, dict):
            raise TypeError(f"expected a dict, found {type(state).__name__}")
        python = _python_state(state["python"])
        numpy = _numpy_state(state["numpy"])
        cpu = _small_tensor(state["torch"], "torch", len(torch.get_rng_state())).to(torch.uint8)
        _trial(random.getstate, random.setstate, python)
        _trial(np.random.get_state, np.random.set_state, numpy)
        _trial(torch.get_rng_state, torch.set_rng_state, cpu)
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError, IndexError) as exc:
        raise StateDictMismatchError(
            f"{where}: the saved RNG state is malformed ({exc}); pass rng=False to skip it"
        ) from exc
    return PreparedRng(python, numpy, cpu, _cuda_states(state.get("cuda"), where))


def _small_tensor(value: Any, name: str, numel: int) -> torch.Tensor:
    """``value`` as a contiguous CPU tensor of exactly ``numel`` elements (checked first)."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: expected a tensor, found {type(value).__name__}")
    if value.numel() != numel:
        raise ValueError(f"{name}: expected {numel} elements, found {value.numel()}")
    return value.detach().to("cpu").contiguous()


def _python_state(py: Any) -> tuple:
    if not isinstance(py, dict):
        raise TypeError("python: expected a dict")
    words = _small_tensor(py["state"], "python.state", _PY_WORDS)
    gauss = py["gauss"]
    if gauss is not None and not isinstance(gauss, float):
        raise TypeError("python.gauss: expected a float or None")
    return (int(py["version"]), tuple(int(x) for x in words.tolist()), gauss)


def _numpy_state(npy: Any) -> tuple:
    if not isinstance(npy, dict) or not isinstance(npy["name"], str):
        raise TypeError("numpy: expected a dict with a generator name")
    keys = _small_tensor(npy["keys"], "numpy.keys", _NP_WORDS)
    values = keys.to(torch.int64).numpy()
    if values.min() < 0 or values.max() >= 2**32:
        raise ValueError("numpy.keys: values outside 0..2**32-1")
    return (
        npy["name"],
        values.astype(np.uint32),
        int(npy["pos"]),
        int(npy["has_gauss"]),
        float(npy["cached"]),
    )


def _trial(get: Any, set_: Any, value: Any) -> None:
    """Raise if the generator rejects ``value``; its own state is unchanged afterwards."""
    saved = get()
    try:
        set_(value)
    finally:
        set_(saved)


def _cuda_states(saved: Any, where: str) -> list[torch.Tensor]:
    if not saved:
        return []
    if not isinstance(saved, list) or len(saved) > _MAX_CUDA_DEVICES:
        raise StateDictMismatchError(
            f"{where}.cuda: expected a list of at most {_MAX_CUDA_DEVICES} per-device states; "
            "pass rng=False to skip the RNG state"
        )
    if not torch.cuda.is_available():
        return []  # saved on a GPU machine, resumed on CPU: CUDA streams cannot be reproduced here
    count = torch.cuda.device_count()
    if len(saved) != count:
        raise StateDictMismatchError(
            f"{where}.cuda: the checkpoint holds RNG state for {len(saved)} CUDA devices but "
            f"{count} are visible; make the same devices visible or pass rng=False"
        )
    size = len(torch.cuda.get_rng_state(0))
    try:
        return [_small_tensor(t, f"cuda[{i}]", size).to(torch.uint8) for i, t in enumerate(saved)]
    except (TypeError, ValueError) as exc:
        raise StateDictMismatchError(
            f"{where}.cuda: the saved RNG state is malformed ({exc}); pass rng=False to skip it"
        ) from exc
