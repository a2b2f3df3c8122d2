"""Two-process checkpoint benchmark: torchkeep's DCP storage vs DCP's FileSystemWriter vs
rank-0 ``torch.save``, on the same state (gloo, CPU).

Workloads: ``ddp`` (an LLM-like model replicated on both ranks, as under DDP: DCP's dedup
splits the writing between the ranks) and ``fsdp`` (the same model sharded with FSDP2
``fully_shard``: each rank writes its own shards). Every save ends with the data fsynced (DCP's
``sync_files=True``, torchkeep's commit, ``os.fsync`` after ``torch.save``). Loads read into a
zeroed model of the same layout, first with the files evicted from the page cache
(``posix_fadvise(DONTNEED)``, "cold"), then again with them cached by that read ("warm").
For ``fsdp`` one more cold load goes into an unsharded model on every rank ("load reshard":
each rank reads both ranks' chunks). Times are rank 0's wall time from a barrier before the
operation to a barrier after it. Contenders are rotated between repetitions.

    python benchmarks/distributed.py                      # ~1.2 GB LLM-like, 3 repetitions
    python benchmarks/distributed.py --size-mb 256 --reps 2
    python benchmarks/distributed.py --out benchmarks/results/distributed.jsonl

Prints the medians and appends one JSON row per measurement to ``--out``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from workloads import build_model  # noqa: E402

import torchkeep.distributed as tkd  # noqa: E402
from torchkeep.distributed import TorchkeepReader, TorchkeepWriter  # noqa: E402

MB = 1 << 20
SAVERS = ["torchkeep", "dcp", "torch.save rank 0"]
LOADERS = ["torchkeep", "dcp"]


def _model(workload: str, size: int, world: int, fill: bool) -> torch.nn.Module:
    model = build_model("llm", size, fill=fill, seed=0)
    if not fill:
        with torch.no_grad():
            for t in model.state_dict().values():
                t.zero_()
    if workload == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
    return model


def _evict(directory: str) -> None:
    for base, _dirs, files in os.walk(directory):
        for name in files:
            fd = os.open(os.path.join(base, name), os.O_RDONLY)
            try:
                os.fdatasync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def _save(contender: str, state: dict, path: str, rank: int) -> None:
    if contender == "torchkeep":
        dcp.save(state, storage_writer=TorchkeepWriter(path))
    elif contender == "dcp":
        dcp.save(state, storage_writer=dcp.FileSystemWriter(path))
    else:  # rank 0 gathers nothing here: under DDP it already holds every tensor
        if rank == 0:
            os.makedirs(path)
            with open(os.path.join(path, "model.pt"), "wb") as f:
                torch.save(state, f)
                f.flush()
                os.fsync(f.fileno())


def _load(contender: str, state: dict, path: str) -> None:
    reader = TorchkeepReader(path) if contender == "torchkeep" else dcp.FileSystemReader(path)
    dcp.load(state, storage_reader=reader)


def _timed(fn, *args) -> float:
    dist.barrier()
    start = time.perf_counter()
    fn(*args)
    dist.barrier()
    return time.perf_counter() - start


def _rank_main(rank: int, world: int, args: argparse.Namespace, store: str, rows: list) -> None:
    dist.init_process_group(
        "gloo",
        init_method=f"file://{store}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(minutes=30),
    )
    out = []
    for workload in args.workloads:
        out.extend(_measure(workload, rank, world, args))
    if rank == 0:
        rows.extend(out)
    dist.barrier()
    dist.destroy_process_group()


def _measure(workload: str, rank: int, world: int, args: argparse.Namespace) -> list[dict]:
    """Every repetition of every contender on one workload; rows only matter on rank 0."""
    model = _model(workload, args.size_mb * MB, world, fill=True)
    source = {"model": model.state_dict()}
    target = {"model": _model(workload, args.size_mb * MB, world, fill=False).state_dict()}
    # fsdp: also load the sharded checkpoint into an unsharded copy on every rank (resharding)
    whole = {"model": _model("ddp", args.size_mb * MB, world, fill=False).state_dict()}
    nbytes = sum(v.numel() * v.element_size() for v in source["model"].values())
    savers = SAVERS if workload == "ddp" else SAVERS[:2]
    out = []
    for rep in range(args.reps):
        order = savers[rep % len(savers) :] + savers[: rep % len(savers)]
        for contender in order:
            path = os.path.join(args.dir, f"{workload}-{rep}-{contender.split()[0]}")
            seconds = _timed(_save, contender, source, path, rank)
            out.append(_row(workload, "save", contender, rep, seconds, nbytes))
            if contender in LOADERS:
                for cache in ("cold", "warm"):  # warm: the cold run read it through
                    if cache == "cold" and rank == 0:
                        _evict(path)
                    seconds = _timed(_load, contender, target, path)
                    out.append(_row(workload, f"load {cache}", contender, rep, seconds, nbytes))
                if workload == "fsdp":
                    if rank == 0:
                        _evict(path)
                    seconds = _timed(_load, contender, whole, path)
                    out.append(_row(workload, "load reshard", contender, rep, seconds, nbytes))
            dist.barrier()
            if rank == 0:
                shutil.rmtree(path, ignore_errors=True)
        for contender in LOADERS:
            out.extend(_async_rows(workload, contender, model, source, rep, nbytes, args, rank))
    return out


def _async_rows(
    workload: str,
    contender: str,
    model,
    source: dict,
    rep: int,
    nbytes: int,
    args: argparse.Namespace,
    rank: int,
) -> list[dict]:
    """Time each rank is blocked by an async save, and the time until it is committed."""
    path = os.path.join(args.dir, f"{workload}-{rep}-async-{contender}")
    dist.barrier()
    start = time.perf_counter()
    if contender == "torchkeep":
        pending = tkd.save({"model": model}, path, rng=False, async_save=True)
    else:
        pending = dcp.async_save(source, storage_writer=dcp.FileSystemWriter(path))
    blocked = time.perf_counter() - start
    pending.result()
    dist.barrier()
    total = time.perf_counter() - start
    if rank == 0:
        shutil.rmtree(path, ignore_errors=True)
    return [
        _row(workload, "async blocked", contender, rep, blocked, nbytes),
        _row(workload, "async total", contender, rep, total, nbytes),
    ]


def _row(workload: str, op: str, contender: str, rep: int, seconds: float, nbytes: int) -> dict:
    return {
        "bench": "distributed",
        "workload": workload,
        "op": op,
        "contender": contender,
        "rep": rep,
        "seconds": seconds,
        "bytes": nbytes,
        "world": 2,
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
    }


def _worker(rank: int, world: int, args: argparse.Namespace, store: str, result: str) -> None:
    rows: list = []
    _rank_main(rank, world, args, store, rows)
    if rank == 0:
        with open(result, "w") as f:
            json.dump(rows, f)


def summarize(rows: list[dict]) -> list[str]:
    """Median seconds and GB/s per (workload, op, contender), and torchkeep's ratios."""
    groups: dict[tuple, list[float]] = {}
    for r in rows:
        groups.setdefault((r["workload"], r["op"], r["contender"]), []).append(r["seconds"])
    lines = [f"{'workload':8} {'op':10} {'contender':18} {'median s':>9} {'GB/s':>6} {'vs tk':>6}"]
    for (workload, op, contender), secs in sorted(groups.items()):
        med = statistics.median(secs)
        nbytes = next(r["bytes"] for r in rows if r["workload"] == workload)
        tk = statistics.median(groups.get((workload, op, "torchkeep"), [med]))
        lines.append(
            f"{workload:8} {op:10} {contender:18} {med:9.3f} {nbytes / med / 1e9:6.2f} "
            f"{med / tk:5.2f}x"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mb", type=int, default=0, help="model size (0: ~1.2 GB)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--workloads", nargs="+", default=["ddp", "fsdp"])
    parser.add_argument("--dir", default=None, help="where checkpoints go (default: a temp dir)")
    parser.add_argument("--out", default=os.path.join(HERE, "results", "distributed.jsonl"))
    args = parser.parse_args()
    own = args.dir is None
    args.dir = args.dir or tempfile.mkdtemp(prefix="tk-dist-bench-", dir=os.getcwd())
    try:
        store = os.path.join(args.dir, "store")
        result = os.path.join(args.dir, "rows.json")
        mp.start_processes(_worker, args=(2, args, store, result), nprocs=2, start_method="spawn")
        with open(result) as f:
            rows = json.load(f)
    finally:
        if own:
            shutil.rmtree(args.dir, ignore_errors=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    print("\n".join(summarize(rows)))


if __name__ == "__main__":
    main()
