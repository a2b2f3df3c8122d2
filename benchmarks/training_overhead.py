"""How much slower does training get when it checkpoints every K steps? (issue 23)

A 7-layer MLP of width 1536 trained with AdamW on synthetic data (~200 MB of parameters and
optimizer state), a checkpoint every ``K`` = 10 steps. Blocks of ``K`` steps with and without a
checkpoint alternate in one process (per contender), so the host's drift cancels; a block with a
checkpoint saves after its first step and waits, at its end, for any background work of that
save (so nothing is hidden past the block). overhead = (median block with - median block
without) / median block without, over ``--reps`` (>= 11) pairs. Each contender runs in a fresh
process. The frozen fine-tune setting freezes a 7-layer backbone and trains one head layer of
the same width (87.5 % of parameters frozen) and also reports bytes written per checkpoint.

    python benchmarks/training_overhead.py                 # full run, rows to benchmarks/results/
    python benchmarks/training_overhead.py --reps 3 --quick  # a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

#: Not a checkpoint: a background thread that only copies the state out and checksums it (no
#: file, no I/O), the least work any snapshot that must not block the loop has to do. Its
#: overhead is the floor the others are measured against on this machine.
FLOOR = "floor: copy+hash only"
#: Not a checkpoint either: the same bytes written from one page-aligned buffer with O_DIRECT
#: in 8 MiB writes and fsynced by a background thread (no copy, no hash), the least any
#: checkpoint of this state must write. On a VM the host emulates the disk, and that work can
#: take CPU time from the guest that the guest's own accounting does not show.
WRITE_FLOOR = "floor: O_DIRECT write only"
HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
FULL = [
    "torch.save",
    "dcp.save",
    "dcp.async_save",
    "tk sync",
    "tk copy",
    "tk overlap",
    FLOOR,
    WRITE_FLOOR,
]
FROZEN = ["tk sync", "tk overlap+incremental"]
MANAGERS = {
    "tk sync": {"snapshot": "sync"},
    "tk copy": {"snapshot": "copy"},
    "tk overlap": {"snapshot": "overlap"},
    "tk overlap+incremental": {"snapshot": "overlap", "incremental": True},
}


def _setup(setting: str, width: int, batch: int) -> tuple[Any, Any, Callable[[], None]]:
    import torch
    from torch import nn

    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(7):
        layers += [nn.Linear(width, width), nn.ReLU()]
    backbone = nn.Sequential(*layers)
    if setting == "frozen":
        backbone.requires_grad_(False)
        model = nn.Sequential(backbone, nn.Linear(width, width))
    else:
        model = backbone
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    x = torch.randn(batch, width)
    y = torch.randn(batch, width)

    def step() -> None:
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return model, opt, step


def _dir_bytes(path: str) -> int:
    total = 0
    for root, _, files in os.walk(path):
        total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
    return total


def _fsync_tree(path: str) -> None:
    for root, _, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)


def _saver(name: str, model: Any, opt: Any, workdir: str) -> tuple[Callable, Callable, Callable]:
    """(save(n), finish(), bytes_of_last()) for one contender."""
    import torch

    last = {"path": ""}
    if name == FLOOR:
        return _floor(model, opt)
    if name == WRITE_FLOOR:
        return _write_floor(model, opt, workdir)
    if name in MANAGERS:
        import torchkeep

        mgr = torchkeep.CheckpointManager(workdir, keep_last=2, **MANAGERS[name])
        state = {"model": model, "opt": opt}
        return (
            lambda n: mgr.save(n, state),
            mgr.wait,
            lambda: mgr.steps()[-1].size,
        )
    if name == "torch.save":

        def save(n: int) -> None:
            last["path"] = os.path.join(workdir, f"ckpt{n % 2}.pt")
            with open(last["path"], "wb") as f:
                torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, f)
                f.flush()
                os.fsync(f.fileno())

        return save, lambda: None, lambda: os.path.getsize(last["path"])
    import torch.distributed.checkpoint as dcp

    pending: list[Any] = []

    def dcp_save(n: int) -> None:
        last["path"] = os.path.join(workdir, f"dcp{n % 2}")
        shutil.rmtree(last["path"], ignore_errors=True)
        obj = {"model": model.state_dict(), "opt": _flat_optimizer(opt)}
        if name == "dcp.async_save":
            pending.append(dcp.async_save(obj, checkpoint_id=last["path"]))
        else:
            dcp.save(obj, checkpoint_id=last["path"])
            _fsync_tree(last["path"])

    def finish() -> None:
        while pending:
            pending.pop().result()
            _fsync_tree(last["path"])

    return dcp_save, finish, lambda: _dir_bytes(last["path"])


def _floor(model: Any, opt: Any) -> tuple[Callable, Callable, Callable]:
    """The FLOOR contender: copy + checksum of every tensor in a background thread."""
    import torch

    from torchkeep.transfer.pool import parallel_copy_hash

    pairs: list = []

    def prepare() -> None:
        for t in _state_tensors(model, opt):
            src = t.detach().reshape(-1).view(torch.uint8).numpy()
            pairs.append((src.copy(), src))

    save, finish = _in_background(prepare, lambda: parallel_copy_hash(pairs))
    return save, finish, lambda: sum(src.nbytes for _, src in pairs)


def _write_floor(model: Any, opt: Any, workdir: str) -> tuple[Callable, Callable, Callable]:
    """The WRITE_FLOOR contender: an O_DIRECT write + fsync of the state's bytes."""
    import mmap

    path = os.path.join(workdir, "state.bin")
    images: list[mmap.mmap] = []

    def prepare() -> None:
        nbytes = sum(t.numel() * t.element_size() for t in _state_tensors(model, opt))
        images.append(mmap.mmap(-1, -(-nbytes // 4096) * 4096))
        images[0][:] = b"\x01" * len(images[0])  # touched once, as a reused buffer is

    def write() -> None:
        view = memoryview(images[0])
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT)
        try:
            for offset in range(0, len(view), 8 << 20):
                os.pwrite(fd, view[offset : offset + (8 << 20)], offset)
            os.fsync(fd)
        finally:
            os.close(fd)

    save, finish = _in_background(prepare, write)
    return save, finish, lambda: len(images[0])


def _in_background(
    prepare: Callable[[], None], job: Callable[[], Any]
) -> tuple[Callable, Callable]:
    """save(n) and finish() of a floor: ``prepare`` runs at the first save (the optimizer has
    state only after its first step), then each save runs ``job`` in a thread of its own and
    finish() joins them."""
    import threading

    running: list[threading.Thread] = []
    prepared: list[bool] = []

    def save(n: int) -> None:
        if not prepared:
            prepare()
            prepared.append(True)
        running.append(threading.Thread(target=job))
        running[-1].start()

    def finish() -> None:
        while running:
            running.pop().join()

    return save, finish


def _state_tensors(model: Any, opt: Any) -> list[Any]:
    tensors = list(model.state_dict().values()) + list(_flat_optimizer(opt).values())
    return [t for t in tensors if t.numel()]


def cost(reps: int, width: int, batch: int) -> None:
    """CPU time (all threads) and wall time of one save, per torchkeep mode, without training
    in between: the work a checkpoint takes from the training loop's cores."""
    import torchkeep

    model, opt, step = _setup("full", width, batch)
    step()
    for name in ("tk sync", "tk copy", "tk overlap"):
        workdir = tempfile.mkdtemp(prefix="tk-cost-")
        mgr = torchkeep.CheckpointManager(workdir, keep_last=2, **MANAGERS[name])
        state = {"model": model, "opt": opt}
        cpu, wall = [], []
        for n in range(reps + 2):
            c, w = time.process_time(), time.perf_counter()
            mgr.save(n, state)
            mgr.wait()
            if n >= 2:  # the first saves allocate staging
                cpu.append(time.process_time() - c)
                wall.append(time.perf_counter() - w)
        shutil.rmtree(workdir, ignore_errors=True)
        print(
            f"{name:12s} CPU per save {1000 * statistics.median(cpu):6.1f} ms, "
            f"wall {1000 * statistics.median(wall):6.1f} ms (medians of {reps})"
        )


def _flat_optimizer(opt: Any) -> dict:
    """The optimizer's tensors under string keys (DCP wants string paths)."""
    flat: dict[str, Any] = {}
    for i, (_, slot) in enumerate(opt.state.items()):
        for key, value in slot.items():
            flat[f"{i}.{key}"] = value
    return flat


def worker(name: str, setting: str, reps: int, k: int, width: int, batch: int) -> list[dict]:
    """Time alternating blocks of ``k`` steps with/without a checkpoint; returns the rows."""
    model, opt, step = _setup(setting, width, batch)
    workdir = tempfile.mkdtemp(prefix="tk-train-")
    save, finish, size_of = _saver(name, model, opt, workdir)
    rows: list[dict] = []
    n = 0

    def block(with_ckpt: bool) -> tuple[float, int]:
        nonlocal n
        written = 0
        start = time.perf_counter()
        for i in range(k):
            step()
            n += 1
            if with_ckpt and i == 0:
                save(n)
        if with_ckpt:
            finish()
        seconds = time.perf_counter() - start
        if with_ckpt:
            written = size_of()
        return seconds, written

    try:
        block(False), block(True)  # warm-up: the first save allocates staging etc.
        for rep in range(reps):
            order = (False, True) if rep % 2 == 0 else (True, False)
            for with_ckpt in order:
                seconds, written = block(with_ckpt)
                rows.append(
                    {
                        "bench": "training_overhead",
                        "setting": setting,
                        "contender": name,
                        "rep": rep,
                        "checkpoint": with_ckpt,
                        "seconds": seconds,
                        "bytes_written": written,
                        "steps": k,
                    }
                )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return rows


def trainable_bytes(width: int) -> int:
    """Bytes that change per step in the frozen fine-tune: the head and its AdamW moments."""
    return 3 * 4 * (width * width + width)


def summarize(rows: list[dict], width: int) -> list[dict]:
    out = []
    order = {("full", n): i for i, n in enumerate(FULL)}
    order.update({("frozen", n): 100 + i for i, n in enumerate(FROZEN)})
    keys = sorted({(r["setting"], r["contender"]) for r in rows}, key=lambda t: order.get(t, 999))
    for setting, name in keys:
        mine = [r for r in rows if (r["setting"], r["contender"]) == (setting, name)]
        with_ = statistics.median(r["seconds"] for r in mine if r["checkpoint"])
        without = statistics.median(r["seconds"] for r in mine if not r["checkpoint"])
        written = statistics.median(r["bytes_written"] for r in mine if r["checkpoint"])
        pairs: dict[int, dict[bool, float]] = {}
        for r in mine:
            pairs.setdefault(r["rep"], {})[r["checkpoint"]] = r["seconds"]
        diffs = [p[True] - p[False] for p in pairs.values() if len(p) == 2]
        best_with = min(r["seconds"] for r in mine if r["checkpoint"])
        best_without = min(r["seconds"] for r in mine if not r["checkpoint"])
        row = {
            "setting": setting,
            "contender": name,
            "block_without_s": round(without, 4),
            "block_with_s": round(with_, 4),
            "overhead_pct": round(100 * (with_ - without) / without, 2),
            # the median of each pair's difference (adjacent blocks): drift between pairs cancels
            "paired_overhead_pct": round(100 * statistics.median(diffs) / without, 2),
            # the fastest block of each kind: less sensitive to neighbours' bursts on a
            # shared host (reported beside the median, not instead of it)
            "best_overhead_pct": round(100 * (best_with - best_without) / best_without, 2),
            "mb_written_per_ckpt": round(written / 1e6, 2),
            "pairs": len(mine) // 2,
        }
        if setting == "frozen":
            row["written_per_trainable"] = round(written / trainable_bytes(width), 2)
        out.append(row)
    return out


def _table(summary: list[dict]) -> str:
    head = (
        "| setting | contender | block without (s) | block with (s) | overhead (medians) "
        "| overhead (paired) | overhead (best blocks) | MB/ckpt |"
    )
    lines = [head, "|---|---|---|---|---|---|---|---|"]
    for r in summary:
        ratio = r.get("written_per_trainable")
        extra = f" ({ratio}x trainable)" if ratio is not None else ""
        mb = f"{r['mb_written_per_ckpt']}{extra}"
        lines.append(
            f"| {r['setting']} | {r['contender']} | {r['block_without_s']} | "
            f"{r['block_with_s']} | {r['overhead_pct']:+.1f} % | "
            f"{r.get('paired_overhead_pct', float('nan')):+.1f} % | "
            f"{r['best_overhead_pct']:+.1f} % | {mb} |"
        )
    return "\n".join(lines)


def plot(summary: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    full = [r for r in summary if r["setting"] == "full"]
    fig, ax = plt.subplots(figsize=(7, 3.4))
    names = [r["contender"] for r in full]
    pos = list(range(len(full)))
    bars = (("overhead_pct", "medians", -0.2), ("paired_overhead_pct", "paired", 0.2))
    for key, label, dy in bars:
        ax.barh([p + dy for p in pos], [r.get(key, 0.0) for r in full], 0.4, label=label)
    values = [r.get(key, 0.0) for r in full for key, _, _ in bars]
    lo, hi = min(-5.0, min(values) - 5), min(100.0, max(values) + 12)  # clip a burst's hundreds
    ax.set_xlim(lo, hi)
    for p, r in zip(pos, full):
        for key, _, dy in bars:
            value = r.get(key, 0.0)
            ax.text(
                max(min(value, hi - 8), lo) + 0.5,
                p + dy,
                f"{value:+.1f} %",
                va="center",
                fontsize=7,
            )
    ax.set_yticks(pos, names)
    ax.axvline(2, color="#c44e52", linestyle="--", linewidth=1, label="2 % target")
    ax.set_xlabel("training slowdown, a checkpoint every 10 steps (%), 2-core VM")
    ax.invert_yaxis()
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=11)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--width", type=int, default=1536)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--quick", action="store_true", help="width 512: a smoke run")
    parser.add_argument("--plot", default=None, help="write the overhead plot (PNG) here")
    parser.add_argument("--out", default=os.path.join(RESULTS, "training_overhead.jsonl"))
    parser.add_argument("--worker", nargs=2, metavar=("CONTENDER", "SETTING"))
    parser.add_argument("--summarize", metavar="JSONL", help="only tabulate/plot stored rows")
    parser.add_argument("--cost", action="store_true", help="CPU time per save, no training")
    parser.add_argument("--only", nargs="*", help="run only these contenders (both settings)")
    parser.add_argument("--run", default=None, help="with --summarize: the run's time stamp")
    a = parser.parse_args()
    width = 512 if a.quick else a.width
    if a.summarize:
        with open(a.summarize) as f:
            stored = [json.loads(line) for line in f if line.strip()]
        stored = [r for r in stored if r.get("bench") == "training_overhead"]  # not notes
        stamp = a.run or max(r["time"] for r in stored)  # default: the latest run
        stored = [r for r in stored if r["time"] == stamp]
        print(f"run {stamp}: {len(stored)} blocks")
        summary = summarize(stored, width)
        print(_table(summary))
        if a.plot:
            plot(summary, a.plot)
        return
    if a.cost:
        cost(a.reps, width, a.batch)
        return
    if a.worker:
        rows = worker(a.worker[0], a.worker[1], a.reps, a.every, width, a.batch)
        print(json.dumps(rows))
        return
    rows: list[dict] = []
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    for setting, names in (("full", FULL), ("frozen", FROZEN)):
        for name in names:
            if a.only and name not in a.only:
                continue
            cmd = [sys.executable, __file__, "--worker", name, setting, "--reps", str(a.reps)]
            cmd += ["--every", str(a.every), "--width", str(width), "--batch", str(a.batch)]
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                print(f"{name} ({setting}) failed:\n{done.stderr[-2000:]}", file=sys.stderr)
                continue
            got = json.loads(done.stdout.strip().splitlines()[-1])
            with open(a.out, "a") as f:  # row by row: a long run interrupted keeps its rows
                for row in got:
                    row.update(time=stamp, host=platform.node(), cpus=os.cpu_count(), width=width)
                    f.write(json.dumps(row) + "\n")
            rows += got
            print(f"{setting:6s} {name:24s} done", file=sys.stderr)
    summary = summarize(rows, width)
    print(_table(summary))
    if a.plot:
        plot(summary, a.plot)


if __name__ == "__main__":
    main()
