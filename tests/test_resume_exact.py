"""Exact resume: a run SIGKILLed anywhere and resumed in a fresh process matches bit for bit.

Each trial runs this file as a training script twice in fresh processes: first with a kill
point (after a chosen step, or at a chosen file operation inside a save), then to resume it
with ``CheckpointManager.restore``. Every loss any process logged and the final parameters must
equal those of an uninterrupted run. The model uses dropout, AdamW, an LR scheduler, a CPU
``GradScaler`` and a shuffled ``StatefulDataLoader`` with its own generator (0 and 2 workers).
Its first layer is frozen (not in the optimizer), so incremental steps have something to skip.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import signal
import subprocess
import sys

import pytest

STEPS_PER_EPOCH = 6  # 48 samples / batch 8
TOTAL_STEPS = 15  # two and a half epochs
SAVE_EVERY = 2
BATCH = 8
SAMPLES = STEPS_PER_EPOCH * BATCH


# ------------------------------------------------------------------------ the training script
#: The manager's save modes by number (the ``async_save`` argument of the script).
MODES = {
    0: {},
    1: {"async_save": True},
    2: {"snapshot": "overlap", "incremental": True},
    3: {"snapshot": "sync", "incremental": True, "verify_unchanged": True},
}


def _train(
    run_dir: str, log: str, out: str, workers: int, kill_step: int, kill_op: int, async_save: int
) -> None:
    import numpy as np
    import torch
    from torch import nn
    from torchdata.stateful_dataloader import StatefulDataLoader

    import torchkeep
    from torchkeep.storage.io import FileOps, use_ops

    torch.manual_seed(1234)
    random.seed(1234)
    np.random.seed(1234)
    data = torch.Generator().manual_seed(7)
    x = torch.randn(SAMPLES, 6, generator=data)
    y = (x.sum(1, keepdim=True) > 0).float()
    dataset = torch.utils.data.TensorDataset(x, y)
    loader = StatefulDataLoader(
        dataset,
        batch_size=BATCH,
        shuffle=True,
        generator=torch.Generator().manual_seed(99),
        num_workers=workers,
    )
    model = nn.Sequential(
        nn.Linear(6, 6), nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 1)
    )
    model[0].requires_grad_(False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.7)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=3)
    state = {
        "model": model,
        "optimizer": opt,
        "scheduler": sched,
        "scaler": scaler,
        "loader": loader,
        "step": 0,
        "epoch": 0,
    }

    class KillAt(FileOps):
        count = 0

        def _tick(self) -> None:
            KillAt.count += 1
            if KillAt.count == kill_op:
                os.kill(os.getpid(), signal.SIGKILL)

        def pwrite(self, fd, data, offset):  # noqa: ANN001, ANN202
            self._tick()
            return super().pwrite(fd, data, offset)

        def fsync(self, fd):  # noqa: ANN001, ANN202
            self._tick()
            return super().fsync(fd)

        def replace(self, src, dst):  # noqa: ANN001, ANN202
            self._tick()
            return super().replace(src, dst)

    mgr = torchkeep.CheckpointManager(run_dir, keep_last=2, **MODES[async_save])
    mgr.restore(state)
    with open(log, "a") as logf:
        while state["step"] < TOTAL_STEPS:
            for xb, yb in loader:
                opt.zero_grad()
                loss = nn.functional.binary_cross_entropy_with_logits(model(xb), yb)
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
                sched.step()
                state["step"] += 1
                step = state["step"]
                logf.write(f"{step} {loss.item().hex()}\n")
                logf.flush()
                if step % SAVE_EVERY == 0 or step == TOTAL_STEPS:
                    if step == kill_step and kill_op:
                        with use_ops(KillAt()):  # async: the kill hits the background write
                            mgr.save(step, state)
                            mgr.wait()
                        os.kill(os.getpid(), signal.SIGKILL)  # the save had fewer ops
                    else:
                        mgr.save(step, state)
                if step == kill_step and not kill_op:
                    os.kill(os.getpid(), signal.SIGKILL)
                if step >= TOTAL_STEPS:
                    break
            else:
                state["epoch"] += 1
    mgr.close()
    torchkeep.save(model.state_dict(), out)


# ----------------------------------------------------------------------------------- the test
def _text(path: str) -> str:
    with open(path) as f:
        return f.read()


def _spawn(args: list[str], err: str) -> int:
    """Run one training process in its own session; kill its orphaned loader workers after."""
    with open(err, "a") as stderr:
        proc = subprocess.Popen(
            [sys.executable, __file__, *args],
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            start_new_session=True,
        )
        try:
            return proc.wait(timeout=120)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # workers outlive a SIGKILLed parent
            proc.wait()


def _run(
    tmp, name: str, workers: int, kill_step: int = 0, kill_op: int = 0, async_save: int = 0
) -> tuple[str, str]:
    run_dir, log, out, err = (os.path.join(tmp, f"{name}.{s}") for s in ("run", "log", "tk", "err"))
    head = [run_dir, log, out, str(workers)]
    tail = [str(int(async_save))]
    if kill_step:
        rc = _spawn([*head, str(kill_step), str(kill_op), *tail], err)
        assert rc == -signal.SIGKILL, _text(err)
    rc = _spawn([*head, "0", "0", *tail], err)
    assert rc == 0, _text(err)
    return log, out


def _losses(log: str) -> dict[int, list[str]]:
    seen: dict[int, list[str]] = {}
    with open(log) as f:
        for line in f:
            step, value = line.split()
            seen.setdefault(int(step), []).append(value)
    return seen


def _kill_points(rng: random.Random, trials: int, first: int) -> list[tuple[str, int, int]]:
    """(kind, step, op): mid first epoch, at an epoch boundary, inside a save (round robin)."""
    kinds = ["mid-epoch", "epoch-boundary", "in-save"]
    points = []
    for i in range(trials):
        kind = kinds[(first + i) % 3]
        if kind == "mid-epoch":
            points.append((kind, rng.randrange(1, STEPS_PER_EPOCH), 0))
        elif kind == "epoch-boundary":
            points.append((kind, rng.choice([STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH]), 0))
        else:
            step = rng.choice(range(SAVE_EVERY, TOTAL_STEPS, SAVE_EVERY))
            points.append((kind, step, rng.randrange(1, 12)))
    return points


@pytest.mark.parametrize("workers", [0, 2])
def test_killed_run_resumes_bit_identical(tmp_path, workers: int, long_run: bool) -> None:
    import torch

    import torchkeep

    ref_log, ref_out = _run(tmp_path, "ref", workers)
    reference = _losses(ref_log)
    assert sorted(reference) == list(range(1, TOTAL_STEPS + 1))
    ref_params = torchkeep.load(ref_out)
    rng = random.Random(workers)
    # make test: every kind with 0 workers, in-save and mid-epoch with 2 (worker start is slow)
    trials = 9 if long_run else 3 if workers == 0 else 2
    for n, (kind, step, op) in enumerate(_kill_points(rng, trials, 0 if workers == 0 else 2)):
        async_save = (n + workers // 2) % 2 == 1  # nw=0: epoch boundary, nw=2: in-save
        log, out = _run(tmp_path, f"t{n}", workers, step, op, async_save)
        seen = _losses(log)
        assert sorted(seen) == sorted(reference), (kind, step, op)
        for s, values in seen.items():
            where = f"{kind} kill at step {step} op {op} async={async_save}: step {s}"
            assert set(values) == set(reference[s]), where
        params = torchkeep.load(out)
        for key, value in ref_params.items():
            assert torch.equal(params[key], value), (kind, step, op, key)


# ------------------------------------------- in-process data-loader resume (fast, many cases)
def _loader(with_generator: bool, workers: int = 0):  # noqa: ANN202
    import torch
    from torchdata.stateful_dataloader import StatefulDataLoader

    gen = torch.Generator().manual_seed(5) if with_generator else None
    data = torch.utils.data.TensorDataset(torch.arange(20))
    return StatefulDataLoader(data, batch_size=3, shuffle=True, generator=gen, num_workers=workers)


def _batches(loader, epochs: int, skip: int = 0) -> list[list[int]]:  # noqa: ANN001
    out: list[list[int]] = []
    for _ in range(epochs):
        out.extend(b[0].tolist() for b in loader)
    return out[skip:]


@pytest.mark.parametrize("with_generator", [True, False])
@pytest.mark.parametrize("position", [0, 3, 6, 7, 9])  # 7 batches per epoch: 7 = epoch end
def test_loader_resume_exact_across_epochs(tmp_path, with_generator: bool, position: int) -> None:
    import torch

    import torchkeep

    torch.manual_seed(0)
    loader = _loader(with_generator)
    consumed: list[list[int]] = []
    it = iter(loader)
    for _ in range(position):
        try:
            consumed.append(next(it)[0].tolist())
        except StopIteration:
            it = iter(loader)
            consumed.append(next(it)[0].tolist())
    torchkeep.save_checkpoint(tmp_path / "l.tk", {"loader": loader})
    expected = [b[0].tolist() for b in it] + _batches(loader, 2)

    torch.manual_seed(123)  # a fresh process starts from another RNG state
    fresh = _loader(with_generator)
    torchkeep.load_checkpoint(tmp_path / "l.tk", {"loader": fresh})
    assert _batches(fresh, 3)[: len(expected)] == expected


# --------------------------------------- overlapped and incremental saves (issue 23)
OVERLAP_KILLS = [
    ("in-save", 4, 5, 2),  # SIGKILL inside an overlapped, incremental save
    ("mid-epoch", 5, 0, 2),  # killed between saves: resume from an incremental step
    ("in-save", 8, 9, 3),  # incremental + verify_unchanged, killed at another write
]


def test_overlap_incremental_resume_bit_identical(tmp_path, long_run: bool) -> None:
    """make test: the first kill point; make test-long: all of them."""
    import torch

    import torchkeep

    ref_log, ref_out = _run(tmp_path, "ref", 0)
    reference, ref_params = _losses(ref_log), torchkeep.load(ref_out)
    for n, (kind, step, op, mode) in enumerate(OVERLAP_KILLS if long_run else OVERLAP_KILLS[:1]):
        log, out = _run(tmp_path, f"t{n}", 0, step, op, mode)
        seen = _losses(log)
        assert sorted(seen) == sorted(reference), (kind, step, op, mode)
        for s, values in seen.items():
            assert set(values) == set(reference[s]), (kind, step, op, mode, s)
        params = torchkeep.load(out)
        for key, value in ref_params.items():
            assert torch.equal(params[key], value), (kind, mode, key)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    for arg in ("run_dir", "log", "out"):
        parser.add_argument(arg)
    for arg in ("workers", "kill_step", "kill_op", "async_save"):
        parser.add_argument(arg, type=int)
    a = parser.parse_args()
    _train(a.run_dir, a.log, a.out, a.workers, a.kill_step, a.kill_op, a.async_save)
