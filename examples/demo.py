"""The seed's "checkpoint" story done right, with torchkeep.CheckpointManager.

Trains a logistic regression (``nn.Linear(6, 1)`` + sigmoid) with SGD on synthetic data,
checkpointing every epoch (keep the last 3 and the best 1 by validation loss). The demo kills
its own training process midway through an epoch (SIGKILL: no cleanup, no goodbye), resumes
from the latest committed checkpoint in a fresh process, finishes, and prints the checkpoint
table and the final accuracy next to those of a run that was never interrupted.

    python examples/demo.py [--run-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import warnings

# torchdata 0.11 warns about a deprecated torch call of its own on every loader creation.
warnings.filterwarnings("ignore", message=".*set_vital.*")

EPOCHS = 8
BATCH = 32
KILL_AT_STEP = 4 * 13 + 5  # in the middle of epoch 5 (13 batches per epoch)


def _data():  # noqa: ANN202 - returns two TensorDatasets
    import torch

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(512, 6, generator=gen)
    true_w = torch.tensor([1.5, -2.0, 0.7, 0.0, 1.0, -0.5])
    noise = 0.5 * torch.randn(512, generator=gen)
    y = ((x @ true_w + noise) > 0).float().unsqueeze(1)
    data = torch.utils.data.TensorDataset
    return data(x[:400], y[:400]), data(x[400:], y[400:])


def _evaluate(model, val) -> tuple[float, float]:  # noqa: ANN001
    import torch

    x, y = val.tensors
    with torch.no_grad():
        p = torch.sigmoid(model(x))
        loss = torch.nn.functional.binary_cross_entropy(p, y).item()
        acc = ((p > 0.5).float() == y).float().mean().item()
    return loss, acc


def train(run_dir: str, result: str, kill_at: int) -> None:
    """One training process: restore the latest step if any, train to the end."""
    import torch
    from rich.progress import Progress
    from torchdata.stateful_dataloader import StatefulDataLoader

    import torchkeep

    torch.manual_seed(0)
    train_set, val = _data()
    loader = StatefulDataLoader(
        train_set, batch_size=BATCH, shuffle=True, generator=torch.Generator().manual_seed(1)
    )
    model = torch.nn.Linear(6, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    state = {"model": model, "optimizer": opt, "loader": loader, "epoch": 0, "step": 0}
    with torchkeep.CheckpointManager(
        run_dir, keep_last=3, keep_best=1, monitor="val_loss", mode="min"
    ) as mgr:
        resumed = mgr.restore(state)
        if resumed is not None:
            print(f"resumed from step {resumed} (epoch {state['epoch']})", flush=True)
        with Progress(transient=False) as bar:
            task = bar.add_task("training", total=EPOCHS * len(loader), completed=state["step"])
            while state["epoch"] < EPOCHS:
                for xb, yb in loader:
                    opt.zero_grad()
                    loss = torch.nn.functional.binary_cross_entropy(torch.sigmoid(model(xb)), yb)
                    loss.backward()
                    opt.step()
                    state["step"] += 1
                    bar.update(task, advance=1)
                    if state["step"] == kill_at:
                        bar.refresh()
                        print(f"\n*** simulated crash at step {kill_at} (SIGKILL) ***", flush=True)
                        os.kill(os.getpid(), signal.SIGKILL)
                state["epoch"] += 1
                val_loss, val_acc = _evaluate(model, val)
                mgr.save(state["step"], state, metrics={"val_loss": val_loss, "val_acc": val_acc})
    _, acc = _evaluate(model, val)
    weights = {k: v.tolist() for k, v in model.state_dict().items()}
    with open(result, "w") as f:
        json.dump({"accuracy": acc, "weights": weights}, f)


def _run(run_dir: str, result: str, kill_at: int = 0) -> int:
    cmd = [sys.executable, __file__, "--train", run_dir, "--result", result]
    return subprocess.run([*cmd, "--kill-at", str(kill_at)], check=False).returncode


def _read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def _table(run_dir: str) -> None:
    from rich.console import Console
    from rich.table import Table

    import torchkeep

    mgr = torchkeep.CheckpointManager(run_dir, keep_last=3, keep_best=1, monitor="val_loss")
    reasons = mgr.kept_reasons()
    table = Table(title=f"checkpoints in {run_dir}")
    for col in ("step", "time", "size", "val_loss", "val_acc", "kept because"):
        table.add_column(col, justify="right" if col != "kept because" else "left")
    for info in mgr.steps():
        table.add_row(
            str(info.step),
            time.strftime("%H:%M:%S", time.localtime(info.time)),
            f"{info.size / 1024:.1f} KiB",
            f"{info.metrics.get('val_loss', float('nan')):.4f}",
            f"{info.metrics.get('val_acc', float('nan')):.3f}",
            ", ".join(reasons.get(info.step, [])),
        )
    Console().print(table)
    mgr.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", help="where the interrupted run checkpoints (default: temp)")
    parser.add_argument("--train", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--kill-at", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.train:
        train(args.train, args.result, args.kill_at)
        return 0
    with tempfile.TemporaryDirectory(prefix="torchkeep-demo-") as tmp:
        run_dir = args.run_dir or os.path.join(tmp, "run")
        out = {name: os.path.join(tmp, f"{name}.json") for name in ("resumed", "reference")}
        print("== 1. training, interrupted midway ==", flush=True)
        rc = _run(run_dir, out["resumed"], KILL_AT_STEP)
        print(f"training process died (exit status {rc}); committed steps survive", flush=True)
        print("== 2. a new process resumes from the latest checkpoint ==", flush=True)
        if _run(run_dir, out["resumed"]) != 0:
            return 1
        print("== 3. an uninterrupted run, for comparison ==", flush=True)
        if _run(os.path.join(tmp, "reference"), out["reference"]) != 0:
            return 1
        _table(run_dir)
        got, ref = (_read_json(out[k]) for k in ("resumed", "reference"))
        same = got == ref
        print(f"final accuracy (interrupted + resumed): {got['accuracy']:.4f}")
        print(f"final accuracy (never interrupted):     {ref['accuracy']:.4f}")
        print("weights bit-identical to the uninterrupted run:", "yes" if same else "NO")
        return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
