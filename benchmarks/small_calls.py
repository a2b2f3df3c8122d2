"""Per-call cost of small saves and loads: a 4 MB state dict of 10 tensors, 30 times each.

What a fixed cost per call (thread start, header work, fsync) weighs when checkpoints are
small and frequent. Prints medians in milliseconds.

    python benchmarks/small_calls.py
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time

import torch

import torchkeep


def main(calls: int = 30) -> None:
    state = {f"t{i}": torch.randn(100_000) for i in range(10)}
    model = torch.nn.Module()
    for key, value in state.items():
        model.register_buffer(key, value.clone())
    saves, loads = [], []
    with tempfile.TemporaryDirectory(dir=os.getcwd()) as directory:
        path = os.path.join(directory, "small.tk")
        for _ in range(calls):
            started = time.perf_counter()
            torchkeep.save(state, path)
            saves.append(time.perf_counter() - started)
            started = time.perf_counter()
            torchkeep.load_state_dict(model, path)
            loads.append(time.perf_counter() - started)
    print(
        f"save {statistics.median(saves) * 1000:.2f} ms, verified load_state_dict "
        f"{statistics.median(loads) * 1000:.2f} ms (4 MB, 10 tensors, medians of {calls})"
    )


if __name__ == "__main__":
    main()
