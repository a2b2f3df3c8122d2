"""Rank programs for test_distributed_multi.py (run by _dist_workers.launch in spawned ranks)."""

from __future__ import annotations

import json
import os
import signal
import time
import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import torchkeep
from torchkeep.distributed import RankStateSkipped, TorchkeepWriter, load, save
from torchkeep.errors import DistributedCheckpointError


def mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))


def fsdp(world: int, seed: int = 0) -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    model = mlp(seed)
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def loader(rank: int, world: int):
    from torch.utils.data import DistributedSampler, TensorDataset
    from torchdata.stateful_dataloader import StatefulDataLoader

    gen = torch.Generator().manual_seed(5)
    data = TensorDataset(torch.randn(64, 16, generator=gen), torch.randn(64, 8, generator=gen))
    sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=True, seed=3)
    return StatefulDataLoader(data, batch_size=4, sampler=sampler)


def train_step(model: nn.Module, opt: torch.optim.Optimizer, x, y) -> float:
    noisy = x + 0.01 * torch.randn_like(x)  # draws from this rank's RNG
    loss = F.mse_loss(model(noisy), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss.item()


def full(tensor):
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def snapshot(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Full (unsharded) parameters and Adam moments, keyed by name (collective for DTensor)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, opt)
    out = {f"model.{k}": full(v).detach().clone() for k, v in msd.items()}
    for fqn, st in osd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                out[f"optim.{fqn}.{k}"] = full(v).detach().clone()
    return out


def fsdp_state(world: int, rank: int, seed: int = 0) -> dict:
    model = fsdp(world, seed)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    return {"model": model, "optim": opt, "sched": sched, "loader": loader(rank, world), "step": 0}


def assert_same(actual: dict, expected: dict) -> None:
    assert sorted(actual) == sorted(expected), (sorted(actual), sorted(expected))
    for k in expected:
        assert torch.equal(actual[k], expected[k]), f"{k} differs after resharded load"


# -- phase A: world size 2 ------------------------------------------------------------------
def phase_a(rank: int, world: int, root: str) -> dict:
    out = {"ddp": ddp_roundtrip(rank, world, root, "ddp2")}
    state = fsdp_state(world, rank)
    for x, y in list(state["loader"])[:2]:
        train_step(state["model"], state["optim"], x, y)
    state["sched"].step()
    state["step"] = 2
    save(state, os.path.join(root, "A"))
    ref = snapshot(state["model"], state["optim"])
    if rank == 0:
        torchkeep.save(ref, os.path.join(root, "A.ref.safetensors"))
    out["resume"] = resume_first_run(rank, world, root)
    out["raise"] = failing_save(rank, world, root, state)
    fresh = fsdp_state(world, rank, seed=7)
    load(fresh, os.path.join(root, "A"))  # the previous step restores after the failed save
    assert_same(snapshot(fresh["model"], fresh["optim"]), ref)
    assert fresh["step"] == 2 and fresh["sched"].last_epoch == 1
    out["killed"] = killed_save(rank, world, root, state)  # rank 1 dies here
    return out


def ddp_roundtrip(rank: int, world: int, root: str, name: str) -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = DDP(mlp(0))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    torch.manual_seed(10 + rank)
    train_step(model, opt, torch.randn(4, 16), torch.randn(4, 8))
    path = os.path.join(root, name)
    save({"model": model, "optim": opt, "epoch": 3}, path)
    with open(os.path.join(path, "checkpoint.json")) as f:
        doc = json.load(f)
    writers = {}
    for fqn, spec in doc["tensors"].items():
        assert len(spec["chunks"]) == 1, f"{fqn} written {len(spec['chunks'])} times"
        writers[fqn] = spec["chunks"][0]["file"]
    fresh = DDP(mlp(99))
    fresh_opt = torch.optim.Adam(fresh.parameters(), lr=0.01)
    state = {"model": fresh, "optim": fresh_opt, "epoch": 0}
    load(state, path)
    for (k, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), k
    sa, sb = opt.state_dict()["state"], fresh_opt.state_dict()["state"]
    assert all(torch.equal(sa[i]["exp_avg"], sb[i]["exp_avg"]) for i in sa)
    assert state["epoch"] == 3
    return {"writers": writers}


def _save_that_fails(
    state: dict, path: str, method: str, replacement, what: str, **kwargs
) -> tuple[DistributedCheckpointError, float]:
    """Save with ``TorchkeepWriter.<method>`` replaced; returns the error this rank raised and
    the seconds until it did. A save that succeeds fails the scenario (``what`` says why)."""
    original = getattr(TorchkeepWriter, method)
    setattr(TorchkeepWriter, method, replacement)
    start = time.monotonic()
    try:
        save(state, path, **kwargs)
    except DistributedCheckpointError as exc:
        return exc, time.monotonic() - start
    finally:
        setattr(TorchkeepWriter, method, original)
    raise AssertionError(what)


def failing_save(rank: int, world: int, root: str, state: dict) -> dict:
    original = TorchkeepWriter.write_data

    def broken(self, plan, planner):
        if rank == 1:
            raise RuntimeError("injected disk failure")
        return original(self, plan, planner)

    path = os.path.join(root, "raised")
    exc, _ = _save_that_fails(state, path, "write_data", broken, "the save did not raise")
    return {"failures": sorted(exc.failures), "message": str(exc)}


def killed_save(rank: int, world: int, root: str, state: dict) -> dict:
    """Rank 1 dies (SIGKILL) while writing; rank 0 must raise, not hang, and not commit."""
    original = TorchkeepWriter.write_data

    def dying(self, plan, planner):
        if rank == 1:
            os.kill(os.getpid(), signal.SIGKILL)
        return original(self, plan, planner)

    save(state, os.path.join(root, "warmup"), timeout=20)  # creates the 20 s group on both
    path = os.path.join(root, "killed")
    what = "the save survived the death of rank 1"
    exc, seconds = _save_that_fails(state, path, "write_data", dying, what, timeout=20)
    return {"seconds": seconds, "message": str(exc)}


# -- exact resume at an unchanged world size ----------------------------------------------
def _train(state: dict, batches, steps: int) -> list[float]:
    return [train_step(state["model"], state["optim"], *next(batches)) for _ in range(steps)]


def resume_first_run(rank: int, world: int, root: str) -> list[float]:
    state = fsdp_state(world, rank, seed=1)
    torch.manual_seed(100 + rank)  # each rank draws its own noise
    batches = iter(state["loader"])
    _train(state, batches, 2)
    save(state, os.path.join(root, "resume"))
    losses = _train(state, batches, 2)
    final = snapshot(state["model"], state["optim"])
    if rank == 0:
        torchkeep.save(final, os.path.join(root, "resume.final.safetensors"))
    return losses


def resume_second_run(rank: int, world: int, root: str) -> list[float]:
    state = fsdp_state(world, rank, seed=2)
    torch.manual_seed(12345)  # a different RNG state: the restore must put the saved one back
    load(state, os.path.join(root, "resume"))
    losses = _train(state, iter(state["loader"]), 2)
    assert_same(
        snapshot(state["model"], state["optim"]),
        torchkeep.load(os.path.join(root, "resume.final.safetensors")),
    )
    return losses


# -- other world sizes --------------------------------------------------------------------
def load_resharded(rank: int, world: int, root: str, name: str, ref: str) -> list[str]:
    state = fsdp_state(world, rank, seed=7)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load(state, os.path.join(root, name))
    assert_same(snapshot(state["model"], state["optim"]), torchkeep.load(os.path.join(root, ref)))
    assert state["step"] == 2 and state["sched"].last_epoch == 1
    return [w.category.__name__ for w in caught if issubclass(w.category, RankStateSkipped)]


def phase_b(rank: int, world: int, root: str) -> dict:
    skipped = load_resharded(rank, world, root, "A", "A.ref.safetensors")
    state = fsdp_state(world, rank, seed=8)
    load(state, os.path.join(root, "A"))
    save(state, os.path.join(root, "B"))
    return {"skipped": skipped}


def phase_c(rank: int, world: int, root: str) -> dict:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    from torchkeep.distributed import TorchkeepReader

    skipped = load_resharded(rank, world, root, "A", "A.ref.safetensors")
    # Plain DCP with DCP's own default load planner: only the storage reader is torchkeep's.
    model = fsdp(world, seed=9)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    msd, osd = get_state_dict(model, opt)
    plain = {"modules": {"model": msd}, "optimizers": {"optim": osd}, "values": (None,)}
    dcp.load(plain, storage_reader=TorchkeepReader(os.path.join(root, "A")))
    set_state_dict(model, opt, model_state_dict=msd, optim_state_dict=osd)
    assert_same(snapshot(model, opt), torchkeep.load(os.path.join(root, "A.ref.safetensors")))
    assert plain["values"][0]["step"] == 2
    out = {"skipped": skipped, "ddp": ddp_roundtrip(rank, world, root, "ddp4")}
    out["coordinator_killed"] = coordinator_killed(rank, world, root)  # rank 0 dies here
    return out


def coordinator_killed(rank: int, world: int, root: str) -> dict:
    """Rank 0 dies after writing the metadata, just before the commit's rename: the other ranks
    raise (no hang) and no step appears."""
    state = {"model": mlp(0), "step": 1}
    save(state, os.path.join(root, "warmup4"), timeout=20)  # the 20 s group, made on all ranks

    def dying(self, metadata, results):
        os.kill(os.getpid(), signal.SIGKILL)

    path = os.path.join(root, "coordinator-killed")
    what = "the save survived the death of the coordinator"
    exc, seconds = _save_that_fails(state, path, "finish", dying, what, timeout=20)
    return {"seconds": seconds, "message": str(exc)}


def phase_d(rank: int, world: int, root: str) -> dict:
    skipped = load_resharded(rank, world, root, "B", "A.ref.safetensors")
    assert not os.path.exists(os.path.join(root, "killed"))
    assert dist.get_world_size() == 2
    out = {"skipped": skipped, "resume": resume_second_run(rank, world, root)}
    out["async"] = async_save_snapshot(rank, world, root)
    out["steps"] = run_steps(rank, world, root)
    return out


def run_steps(rank: int, world: int, root: str) -> dict:
    """Numbered steps: retention by the coordinator, every rank agrees on the latest."""
    from torchkeep.distributed import latest_step, restore, save_step, steps

    run = os.path.join(root, "run")
    state = {"model": mlp(0), "step": 0}
    for step in (1, 2, 3):
        state["step"] = step
        save_step(run, step, state, keep_last=2)
    fresh = {"model": mlp(1), "step": 0}
    restored = restore(run, fresh)
    return {
        "steps": steps(run),
        "latest": latest_step(run),
        "restored": restored,
        "value": fresh["step"],
    }


def async_save_snapshot(rank: int, world: int, root: str) -> dict:
    """The caller gets control back after its snapshot; changing the model at once does not
    change what is saved; the commit happens in the background."""
    state = fsdp_state(world, rank, seed=3)
    before = snapshot(state["model"], state["optim"])
    path = os.path.join(root, "async")
    start = time.perf_counter()
    handle = save(state, path, async_save=True)
    blocked = time.perf_counter() - start
    with torch.no_grad():
        for p in state["model"].parameters():
            p.zero_()
    handle.wait()
    total = time.perf_counter() - start
    assert os.path.exists(os.path.join(path, "checkpoint.json"))
    fresh = fsdp_state(world, rank, seed=4)
    load(fresh, path)
    assert_same(snapshot(fresh["model"], fresh["optim"]), before)
    return {"blocked": blocked, "total": total}
