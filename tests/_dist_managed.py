"""Rank programs for test_distributed_manager.py: the same CheckpointManager / save_checkpoint
API inside a process group (run by _dist_workers.launch in spawned ranks)."""

from __future__ import annotations

import json
import os
import time
import warnings

import torch
import torch.distributed as dist

import torchkeep
from _dist_scenarios import assert_same, fsdp_state, mlp, snapshot, train_step
from torchkeep import CheckpointManager, load_checkpoint, save_checkpoint
from torchkeep.errors import CorruptionError, TorchkeepError

#: step -> the loss metric saved with it: step 2 is the best, 10 a multiple of keep_every.
LOSSES = {1: 5.0, 2: 1.0, 3: 4.0, 10: 3.0, 11: 2.0}


def managed(rank: int, world: int, root: str) -> dict:
    out: dict = {}
    run = os.path.join(root, "run")
    mgr = CheckpointManager(run, keep_last=2, keep_best=1, monitor="loss", keep_every=10)
    out["resume"] = _resume(mgr, rank, world, root)
    out["steps"] = [s.step for s in mgr.steps()]
    out["latest"] = mgr.latest_step()
    out["exists"] = _raises(lambda: mgr.save(11, {"model": mlp(0)}), TorchkeepError)
    out["fallback"] = _fallback(mgr, rank, world, run)
    mgr.close()
    out["async"] = _async(rank, world, root)
    out["functions"] = _functions(rank, world, root)
    out["single_step"] = _single_process_step(rank, root)
    dist.barrier()
    return out


def _raises(call, kind: type[BaseException]) -> str:
    try:
        call()
    except kind as exc:
        return type(exc).__name__
    raise AssertionError(f"no {kind.__name__} raised")


def _resume(mgr: CheckpointManager, rank: int, world: int, root: str) -> dict:
    """Train with numbered saves; a fresh state restored by the manager continues identically."""
    state = fsdp_state(world, rank, seed=1)
    torch.manual_seed(100 + rank)
    batches = iter(state["loader"])
    for step, loss in LOSSES.items():
        train_step(state["model"], state["optim"], *next(batches))
        state["step"] = step
        mgr.save(step, state, metrics={"loss": torch.tensor(loss)})
    after = [train_step(state["model"], state["optim"], *next(batches)) for _ in range(2)]
    final = snapshot(state["model"], state["optim"])
    fresh = fsdp_state(world, rank, seed=2)
    torch.manual_seed(999)  # the restore must put this rank's saved RNG back
    restored = mgr.restore(fresh)
    batches = iter(fresh["loader"])
    again = [train_step(fresh["model"], fresh["optim"], *next(batches)) for _ in range(2)]
    assert_same(snapshot(fresh["model"], fresh["optim"]), final)
    return {"restored": restored, "step": fresh["step"], "same_losses": after == again}


def _fallback(mgr: CheckpointManager, rank: int, world: int, run: str) -> dict:
    """The newest step damaged (by rank 0): restore raises on every rank, fallback walks back."""
    if rank == 0:
        _flip_tensor_byte(os.path.join(run, "step-0000000011", "rank-00001.safetensors"))
    dist.barrier()
    fresh = fsdp_state(world, rank, seed=3)
    strict = _raises(lambda: mgr.restore(fresh), CorruptionError)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        used = mgr.restore(fsdp_state(world, rank, seed=4), fallback=True)
    note = mgr.last_restore_note or ""
    return {"strict": strict, "used": used, "warned": bool(caught), "note": "step 11" in note}


def _flip_tensor_byte(shard: str) -> None:
    """Flip the first data byte of the first tensor chunk in a rank file."""
    with open(shard, "r+b") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
        name = next(k for k in header if k.startswith("t."))
        f.seek(8 + size + header[name]["data_offsets"][0])
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))


def _async(rank: int, world: int, root: str) -> dict:
    """async_save=True per rank: the caller blocks for its snapshot; commit and retention run
    in the background; changes right after save() do not reach the step."""
    run = os.path.join(root, "async-run")
    mgr = CheckpointManager(run, async_save=True, keep_last=1)
    state = fsdp_state(world, rank, seed=5)
    mgr.save(1, state)
    before = snapshot(state["model"], state["optim"])
    start = time.perf_counter()
    handle = mgr.save(2, state)  # waits for step 1 first
    blocked = time.perf_counter() - start
    with torch.no_grad():
        for p in state["model"].parameters():
            p.zero_()
    handle.wait()
    total = time.perf_counter() - start
    steps = [s.step for s in mgr.steps()]
    fresh = fsdp_state(world, rank, seed=6)
    restored = mgr.restore(fresh)
    assert_same(snapshot(fresh["model"], fresh["optim"]), before)
    mgr.close()
    return {"steps": steps, "restored": restored, "blocked": blocked, "total": total}


def _functions(rank: int, world: int, root: str) -> dict:
    """save_checkpoint / load_checkpoint detect the group: one directory, resharding load."""
    path = os.path.join(root, "functions")
    state = fsdp_state(world, rank, seed=7)
    state["step"] = 42
    save_checkpoint(path, state)
    fresh = fsdp_state(world, rank, seed=8)
    load_checkpoint(path, fresh)
    assert_same(snapshot(fresh["model"], fresh["optim"]), snapshot(state["model"], state["optim"]))
    return {"files": sorted(os.listdir(path)), "step": fresh["step"]}


def _single_process_step(rank: int, root: str) -> dict:
    """A step saved by rank 0 alone (distributed=False) restores on every rank of the group."""
    run = os.path.join(root, "single-run")
    model = mlp(11)
    if rank == 0:
        with CheckpointManager(run, distributed=False) as alone:
            alone.save(5, {"model": model, "epoch": 9}, metrics={"loss": 0.5})
    dist.barrier()
    fresh = {"model": mlp(12), "epoch": 0}
    with CheckpointManager(run) as mgr:
        used = mgr.restore(fresh)
    same = all(torch.equal(a, b) for a, b in zip(model.parameters(), fresh["model"].parameters()))
    return {"used": used, "epoch": fresh["epoch"], "same": same}


__all__ = ["managed", "torchkeep"]
