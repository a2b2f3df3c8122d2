"""`make bench`: torchkeep against torch.save/load, safetensors, DCP and the device's ceiling.

Every row is measured in this run, in a fresh subprocess per (repetition, workload, contender
family) so peak RSS is the contender's own; families are alternated (rotated) between
repetitions; the table reports medians (and best runs for the ceiling ratio). Saves include
fsync. Loads are measured with the file in the page cache ("warm": read through once before
each run) and, for LLM-like and one-huge, evicted with posix_fadvise(DONTNEED) before each
run ("cold"). The warm loads of LLM-like and one-huge take their seconds from one more process
per repetition that times every family's warm loads side by side, in rotated rounds
(``worker.side_by_side``: a ~70 ms memory copy swings with the host's state for longer than one
family's process runs); their peak RSS still comes from each family's own process.

    python benchmarks/run.py            # full run (~12 min)
    python benchmarks/run.py --quick    # smaller sizes, for development
    python benchmarks/run.py --prefault # every op starts from host-backed memory (VMs)
    python benchmarks/run.py --smoke    # one repetition of tiny sizes: checks that it all runs

Each run's raw rows go to ``benchmarks/results/<run-id>.jsonl`` (``--run-id``; default a time
stamp); commit the file of every run docs/ reports. ``python benchmarks/report.py FILE``
rebuilds the tables and target checks from it. The ceiling is the device's write limit
(``ceiling.py``: O_DIRECT threads, fio-like, thread count and block size from a sweep).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from contenders import FAMILIES  # noqa: E402
from report import BUFFERED_WRITE, DEVICE_CEILING, aggregate, plot, summary  # noqa: E402
from worker import SIDE_BY_SIDE  # noqa: E402

MB = 1 << 20
ALL = ["ceiling", "torchkeep", "torch", "safetensors", "dcp"]
SCALE_OPS = [
    DEVICE_CEILING,
    BUFFERED_WRITE,
    "torchkeep.save",
    "torchkeep verify=True",
    "torch.save",
    "torch.load mmap=True",
    "safetensors.save_file",
    "safetensors.load_file",
]
ASYNC = ["torchkeep.save_async", "dcp.async_save"]  # async rows: LLM-like and one-huge only
LAZY_KEY = "blocks.12.up.weight"


def plan(quick: bool, smoke: bool = False) -> list[tuple[dict, int]]:
    """(spec, repetitions) for each workload; quick runs shrink the big ones; a smoke run
    (checks that everything runs; its figures mean nothing) is one repetition of tiny sizes."""
    if smoke:
        both = ["warm", "cold"]
        scale = {"workload": "scale", "size": 16 * MB, "ops": SCALE_OPS}
        scale["families"] = ["ceiling", "torchkeep", "torch", "safetensors"]
        return [
            # 16 MB: no transformer block fits, only the embedding (so the lazy read takes it)
            (
                {
                    "workload": "llm",
                    "size": 16 * MB,
                    "caches": both,
                    "families": ALL,
                    "lazy_key": "embed.weight",
                },
                1,
            ),
            ({"workload": "huge", "size": 16 * MB, "caches": both, "families": ALL}, 1),
            (scale, 1),
        ]
    big = 256 * MB if quick else 0
    both = ["warm", "cold"]
    specs = [
        ({"workload": "llm", "size": big, "caches": both, "families": ALL}, 3),
        ({"workload": "optim", "size": big, "families": ALL, "skip": ASYNC}, 3),
        ({"workload": "small", "families": ALL, "skip": ASYNC}, 3),
        ({"workload": "huge", "size": big, "caches": both, "families": ALL}, 3),
    ]
    sizes = [64, 128, 256] if quick else [64, 128, 256, 512, 1024, 2048]
    for mb in sizes:
        spec = {"workload": "scale", "size": mb * MB, "ops": SCALE_OPS}
        spec["families"] = ["ceiling", "torchkeep", "torch", "safetensors"]
        specs.append((spec, 2 if mb >= 1024 else 3))
    return specs


def run_worker(
    spec: dict, family: str, directory: str, prefault: bool = False, rep: int = 0
) -> list[dict]:
    job = {k: v for k, v in spec.items() if k != "families"}
    job.update(family=family, dir=directory, prefault=prefault, rep=rep)
    if family == SIDE_BY_SIDE:
        job["load_families"] = [f for f in spec["families"] if FAMILIES[f][2]]  # have loads
    if spec["workload"] == "llm" and family == "torchkeep":
        job["lazy"] = spec.get("lazy_key") or (
            LAZY_KEY if not spec.get("size") else "blocks.0.up.weight"
        )
    cmd = [sys.executable, os.path.join(HERE, "worker.py"), json.dumps(job)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"  ! {spec['workload']}/{family} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
        return []
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def remove_stale_setting(directory: str) -> None:
    """Forget a ceiling sweep left by an earlier run in a reused --dir: each run sweeps anew."""
    stale = os.path.join(directory, "ceiling-setting.json")
    if os.path.exists(stale):
        os.unlink(stale)


def write_results(results_dir: str, run_id: str, meta: dict, rows: list[dict]) -> str:
    """Write the run's raw rows to ``<results_dir>/<run_id>.jsonl``: a first line
    ``{"meta": ...}``, then one row per line, each tagged with the run id; returns the path.
    ``report.load_run`` reads it back, so every figure in docs/ can be traced to its rows."""
    if not run_id or os.sep in run_id or run_id.startswith("."):
        raise ValueError(f"run id {run_id!r}: use a plain file name")
    os.makedirs(results_dir, exist_ok=True)
    path = os.path.join(results_dir, f"{run_id}.jsonl")
    if os.path.exists(path):
        raise FileExistsError(f"{path} exists: pick another --run-id")
    with open(path, "w") as f:
        f.write(json.dumps({"meta": meta}) + "\n")
        f.writelines(json.dumps({"run": run_id, **r}) + "\n" for r in rows)
    return path


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    import torch

    return (
        f"{cpu}, {os.cpu_count()} CPUs, {mem:.0f} GiB RAM; Linux {platform.release()}; "
        f"Python {platform.python_version()}, torch {torch.__version__}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller sizes, for development")
    ap.add_argument(
        "--smoke", action="store_true", help="one repetition of tiny sizes: does it all run?"
    )
    ap.add_argument("--run-id", default=None, help="name of the results file (default: a stamp)")
    ap.add_argument(
        "--results",
        default=os.path.join(HERE, "results"),
        help="where the run's raw rows go as <run-id>.jsonl (committed: docs cite them)",
    )
    ap.add_argument("--dir", default=None, help="where checkpoint files go (default: a temp dir)")
    ap.add_argument("--out", default=os.path.join(HERE, "out"), help="results directory")
    ap.add_argument("--plot", default=None, help="PNG path (default: <out>/perf.png)")
    ap.add_argument("--only", nargs="*", help="workloads to run (llm optim small huge scale)")
    ap.add_argument(
        "--prefault",
        action="store_true",
        help="touch and release 2x the checkpoint's memory before each op (see worker.prefault)",
    )
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    directory = args.dir or tempfile.mkdtemp(prefix="torchkeep-bench-", dir=os.getcwd())
    os.makedirs(directory, exist_ok=True)
    remove_stale_setting(directory)
    rows: list[dict] = []
    started = time.time()
    run_id = args.run_id or time.strftime("%Y%m%d-%H%M%S")
    try:
        for spec, reps in plan(args.quick, args.smoke):
            if args.only and spec["workload"] not in args.only:
                continue
            families = list(spec["families"])
            if "warm" in spec.get("caches", []):
                families.append(SIDE_BY_SIDE)
            for rep in range(reps):
                order = families[rep % len(families) :] + families[: rep % len(families)]
                for family in order:
                    got = run_worker(spec, family, directory, args.prefault, rep)
                    rows.extend(got)
                    print(
                        f"  {spec['workload']}{spec.get('size') or ''} rep {rep} {family}: "
                        f"{len(got)} rows ({time.time() - started:.0f} s)",
                        flush=True,
                    )
    finally:
        if not args.dir:
            shutil.rmtree(directory, ignore_errors=True)
    options = (("--quick", args.quick), ("--smoke", args.smoke), ("--prefault", args.prefault))
    flags = [f for f, on in options if on]
    if args.only:
        flags.append("--only " + " ".join(args.only))
    command = " ".join(["python benchmarks/run.py", *flags])
    meta = {
        "run": run_id,
        "command": command,
        "machine": machine(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "seconds": round(time.time() - started),
    }
    results = write_results(args.results, run_id, meta, rows)
    text = (
        f"Run `{run_id}` (raw rows: `{os.path.relpath(results)}`)\n\n"
        f"Command: `{command}` ({meta['seconds']} s)\n\nMachine: {meta['machine']}\n\n"
        + summary(rows)
    )
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(text)
    print(text)
    try:
        plot(aggregate(rows), args.plot or os.path.join(args.out, "perf.png"))
    except ImportError as exc:  # matplotlib comes with the bench extra (make bench installs it)
        print(f"no plot: {exc}; pip install -e '.[bench]'", file=sys.stderr)


if __name__ == "__main__":
    main()
