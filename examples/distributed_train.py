"""FSDP2 training that checkpoints with torchkeep and resumes exactly, under torchrun.

    torchrun --nproc-per-node 2 examples/distributed_train.py RUN_DIR     # CPU, gloo
    torchrun --nproc-per-node 2 examples/distributed_train.py RUN_DIR     # again: resumes

Every rank trains a small MLP sharded with ``fully_shard``, draws noise from its own RNG and
reads its own part of the data through a ``StatefulDataLoader`` (if torchdata is installed).
Each ``--every`` steps all ranks call ``torchkeep.distributed.save_step`` (rank 0 keeps the
newest 2 steps). A second launch restores the latest step, RNG and loader positions included,
and continues as if it had never stopped. On several machines, point RUN_DIR at a filesystem
every node mounts at the same path and launch torchrun with ``--nnodes`` and a rendezvous.
"""

from __future__ import annotations

import argparse
import datetime
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import torchkeep.distributed as tkd


def build(world: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)  # the same initial weights on every rank, then sharded
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 4))
    mesh = init_device_mesh("cpu", (world,))
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def loader(rank: int, world: int):
    gen = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(512, 16, generator=gen), torch.randn(512, 4, generator=gen))
    sampler = DistributedSampler(data, num_replicas=world, rank=rank, seed=2)
    try:
        from torchdata.stateful_dataloader import StatefulDataLoader
    except ImportError:  # without torchdata the position inside an epoch is not saved
        return DataLoader(data, batch_size=8, sampler=sampler)
    return StatefulDataLoader(data, batch_size=8, sampler=sampler)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--every", type=int, default=10)
    args = parser.parse_args()
    dist.init_process_group("gloo", timeout=datetime.timedelta(minutes=5))
    rank, world = dist.get_rank(), dist.get_world_size()
    model, opt = build(world)
    state = {"model": model, "optim": opt, "loader": loader(rank, world), "step": 0}
    torch.manual_seed(100 + rank)  # each rank's own noise stream (saved and restored per rank)
    if tkd.latest_step(args.run_dir) is not None:
        tkd.restore(args.run_dir, state, fallback=True)
        if rank == 0:
            print(f"resumed at step {state['step']}")
    batches = iter(state["loader"])
    while state["step"] < args.steps:
        try:
            x, y = next(batches)
        except StopIteration:
            batches = iter(state["loader"])
            continue
        loss = F.mse_loss(model(x + 0.01 * torch.randn_like(x)), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        state["step"] += 1
        if state["step"] % args.every == 0:
            tkd.save_step(args.run_dir, state["step"], state, keep_last=2)
            if rank == 0:
                print(f"step {state['step']}: loss {loss.item():.6f} (saved)")
    dist.barrier()  # no rank tears the groups down while another still uses them
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
