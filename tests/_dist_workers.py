"""Multi-process harness for the torchkeep.distributed tests (gloo on CPU, spawned ranks).

``launch`` starts ``world`` spawned processes that join one gloo group through a file store and
run ``worker(rank, world, workdir, *args)``. Each rank records its outcome in
``workdir/result-<phase>-<rank>.json`` (its return value, or the traceback of its error), so a
test can assert on every rank, including ranks expected to fail or die. A rank that does not
finish by the deadline is killed: a hang fails the test instead of blocking the suite.
"""

from __future__ import annotations

import datetime
import json
import os
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch.multiprocessing as mp


def _entry(worker: Callable, rank: int, world: int, workdir: str, phase: str, args: tuple):
    import torch.distributed as dist

    out = os.path.join(workdir, f"result-{phase}-{rank}.json")
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"file://{os.path.join(workdir, f'store-{phase}')}",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=60),
        )
        value = worker(rank, world, workdir, *args)
        record = {"ok": True, "value": value}
    except BaseException as exc:  # recorded for the test to inspect
        record = {"ok": False, "type": type(exc).__name__, "error": traceback.format_exc()}
    with open(out, "w") as f:
        json.dump(record, f)
    os._exit(0)  # skip process-group teardown, which can wait on ranks that died


def launch(
    worker: Callable, world: int, workdir: str, phase: str, *args: Any, deadline: float = 240
) -> list[dict | None]:
    """Run ``worker`` on ``world`` ranks; returns each rank's record (None if it left none)."""
    ctx = mp.get_context("spawn")
    procs = [
        ctx.Process(target=_entry, args=(worker, r, world, workdir, phase, args))
        for r in range(world)
    ]
    for p in procs:
        p.start()
    end = time.monotonic() + deadline
    for p in procs:
        p.join(max(0.0, end - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    results = []
    for r in range(world):
        path = os.path.join(workdir, f"result-{phase}-{r}.json")
        if not os.path.exists(path):
            results.append(None)
            continue
        with open(path) as f:
            results.append(json.load(f))
    return results


def values(results: list[dict | None]) -> list[Any]:
    """Every rank's return value; fails with the first rank's traceback otherwise."""
    for rank, rec in enumerate(results):
        assert rec is not None, f"rank {rank} left no result (killed or hung)"
        assert rec["ok"], f"rank {rank} failed:\n{rec['error']}"
    return [rec["value"] for rec in results]
