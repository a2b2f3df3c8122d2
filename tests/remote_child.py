"""Child process of the remote fault tests: saves to S3 until killed.

``python remote_child.py manager URL STEP`` saves step STEP of a deterministic state into the
manager at URL; ``replicate LOCAL URL STEPS`` saves STEPS steps into a two-tier manager and
waits for replication (killed on the way by the parent).
"""

from __future__ import annotations

import sys

import torch

from torchkeep import CheckpointManager


def state(step: int) -> dict:
    gen = torch.Generator().manual_seed(step)
    return {"w": torch.randn(6, 1024, 1024, generator=gen), "step": step}


def main() -> None:
    mode, target = sys.argv[1], sys.argv[2]
    if mode == "manager":
        step = int(sys.argv[3])
        with CheckpointManager(target, rng=False) as mgr:
            snapshot = state(step)
            print("saving", flush=True)  # the parent kills from here on, during the upload
            mgr.save(step, snapshot)
        print("committed", flush=True)
    elif mode == "replicate":
        url, steps = sys.argv[3], int(sys.argv[4])
        with CheckpointManager(target, rng=False, replicate_to=url) as mgr:
            for step in range(steps):
                mgr.save(step, state(step))
            print("saved", flush=True)
            mgr.wait_replication()
        print("replicated", flush=True)


if __name__ == "__main__":
    main()
