"""Rank program of the randomized kill campaign (test_distributed_kill.py).

Both ranks save steps 0 and 1 through the manager (keep_last=2), then start step 2 while a
timer SIGKILLs the victim rank after a random delay between 0 and 0.8 times the measured length
of a save (step 1's): the kill lands
before, inside (planning, writing, the commit) or after the save. The survivor records whether
its save raised and how long it took; the test then checks the run directory.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time

import torch
from torch import nn

from torchkeep import CheckpointManager
from torchkeep.errors import TorchkeepError


def model_at(step: int) -> nn.Module:
    """A model of 16 MB whose every parameter equals ``step`` (so a restore shows the step)."""
    model = nn.Sequential(*[nn.Linear(512, 512) for _ in range(16)])
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float(step))
    return model


def kill_trial(rank: int, world: int, root: str, seed: int) -> dict:
    rng = random.Random(seed)
    victim = rng.randrange(world)
    mgr = CheckpointManager(os.path.join(root, "run"), keep_last=2)
    mgr.save(0, {"model": model_at(0)})  # the first save also sets up the checkpoint group
    start = time.monotonic()
    mgr.save(1, {"model": model_at(1)})  # retention deletes step 0 here
    length = time.monotonic() - start
    delay = rng.uniform(0.0, 0.8 * length)
    state = {"model": model_at(2)}
    if rank == victim:
        threading.Timer(delay, os.kill, (os.getpid(), signal.SIGKILL)).start()
    start = time.monotonic()
    try:
        mgr.save(2, state)
        outcome = "saved"
    except TorchkeepError as exc:
        outcome = f"raised: {type(exc).__name__}: {str(exc)[:200]}"
    seconds = time.monotonic() - start
    if rank == victim:
        time.sleep(delay + 5)  # the timer fires: this rank never reports
    return {
        "victim": victim,
        "delay": delay,
        "save_length": length,
        "outcome": outcome,
        "seconds": seconds,
    }
