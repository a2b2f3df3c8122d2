"""The async snapshot on a busy machine: caller-blocked time of ``save_async`` with the cores
partly taken by other processes (as data-loader workers take them during training).

For each load level (idle; one process busy half the time; two busy 30 % of the time) it
alternates, in one process, a steady-state ``torchkeep.save_async`` of the LLM-like model
(blocked time only) and the same snapshot made with ``Tensor.copy_`` into a reused buffer (the
snapshot torchkeep made before ``pool.parallel_copy``: torch splits each copy over its threads
in fixed shares). Prints medians and ranges in milliseconds.

    .venv/bin/python benchmarks/snapshot_load.py [--reps 10]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from contenders import timed_copy  # noqa: E402
from workloads import build_model  # noqa: E402

LEVELS = {"idle": [], "one process 50 % busy": [0.5], "two processes 30 % busy": [0.3, 0.3]}


def _busy(duty: float, stop: mp.Event) -> None:  # type: ignore[valid-type]
    """Spin for ``duty`` of every 20 ms until ``stop`` is set."""
    while not stop.is_set():
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < 0.02 * duty:
            pass
        time.sleep(0.02 * (1 - duty))


def _measure(state: dict, buffer: torch.Tensor, path: str, reps: int) -> dict[str, list[float]]:
    import torchkeep

    flat = [t.reshape(-1).view(torch.uint8) for t in state.values()]

    def copy_snapshot() -> float:
        return timed_copy(flat, buffer)

    def save_async() -> float:
        t0 = time.perf_counter()
        handle = torchkeep.save_async(state, path)
        blocked = time.perf_counter() - t0
        handle.wait()
        return blocked

    times: dict[str, list[float]] = {"torchkeep.save_async": [], "Tensor.copy_": []}
    ops = [("torchkeep.save_async", save_async), ("Tensor.copy_", copy_snapshot)]
    for rep in range(reps):
        for name, op in ops if rep % 2 else ops[::-1]:
            times[name].append(1e3 * op())
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=10)
    args = ap.parse_args()
    import torchkeep

    state = build_model("llm", 0, True).state_dict()
    buffer = torch.empty(sum(t.nbytes for t in state.values()), dtype=torch.uint8)
    with tempfile.TemporaryDirectory(dir=HERE) as tmp:
        path = os.path.join(tmp, "snap.tk")
        torchkeep.save_async(state, path).wait()  # warms the staging buffer
        _measure(state, buffer, path, 1)  # and the baseline's buffer
        for level, duties in LEVELS.items():
            spawn = mp.get_context("spawn")  # a forked child would make every page copy-on-write
            stop = spawn.Event()
            procs = [spawn.Process(target=_busy, args=(d, stop)) for d in duties]
            for proc in procs:
                proc.start()
            try:
                times = _measure(state, buffer, path, args.reps)
            finally:
                stop.set()
                for proc in procs:
                    proc.join()
            cells = [
                f"{name} {statistics.median(v):.1f} ms [{min(v):.1f}-{max(v):.1f}]"
                for name, v in times.items()
            ]
            print(f"{level:24} " + "   ".join(cells), flush=True)


if __name__ == "__main__":
    main()
