"""Rank program for test_distributed_remote.py: a sharded save to S3 (moto) from 2 ranks."""

from __future__ import annotations

import torch
from torch import nn

from _dist_scenarios import fsdp_state, snapshot
from torchkeep.distributed import TorchkeepWriter, load, save
from torchkeep.errors import DistributedCheckpointError


def remote_world(rank: int, world: int, root: str, url: str) -> dict:
    """Save FSDP state to ``url/good`` (each rank uploads its object, the marker commits), load
    it back; then a save whose rank 1 fails: no marker, every rank raises."""
    state = fsdp_state(world, rank, seed=1)
    save(state, f"{url}/good")
    fresh = fsdp_state(world, rank, seed=2)
    load(fresh, f"{url}/good")
    same = snapshot(state["model"], state["optim"]), snapshot(fresh["model"], fresh["optim"])
    equal = all(torch.equal(a, same[1][k]) for k, a in same[0].items())
    original = TorchkeepWriter.write_data

    def broken(self, plan, planner):
        if rank == 1:
            raise RuntimeError("injected upload failure")
        return original(self, plan, planner)

    TorchkeepWriter.write_data = broken
    try:
        save({"model": nn.Linear(2, 2)}, f"{url}/bad", rng=False)
        failed = None
    except DistributedCheckpointError as exc:
        failed = sorted(exc.failures)
    finally:
        TorchkeepWriter.write_data = original
    return {"equal": equal, "failed": failed}
