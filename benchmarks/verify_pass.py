"""Verified loads and the verification pass, one process per call: a JSON row on stdout.

``load_state_dict`` verifies every checksum before the first byte lands (all or nothing), so
a verified load reads the file twice. This times, on the LLM-like state dict (1.27 GB):
verified and unverified ``load_state_dict``, ``torch.load(mmap=True)`` + ``load_state_dict``
(the target's peer) and ``torchkeep.verify``, warm (medians of ``--reps``) or cold
(``--cold``: evicted with posix_fadvise before each run).

How the page cache holds the file changes the warm figures. Read in by large ``pread`` calls,
ext4 on recent kernels keeps it in large folios (``FileHugePages`` in /proc/meminfo grows) and a
mapping of it needs few page faults; read in by several threads hashing a mapping, it was left
in small pages, and later mapped passes were 1.5x slower. ``--fill pread``/``mmap`` evict and
read the files back that way before timing, ``--fill load`` leaves them as a first verified
load of the measured tree does; each row records ``FileHugePages``. An A/B of two trees
alternates processes::

    for i in 1 2 3; do for t in OLD NEW; do
      PYTHONPATH=$t/src python benchmarks/verify_pass.py --label $t --fill pread
    done; done >> benchmarks/results/verify-pass.jsonl
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import statistics
import sys
import time
from collections.abc import Callable

import torch
from workloads import build_model

import torchkeep


def _evict(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _fill(path: str, how: str) -> None:
    """Evict ``path`` and read it back into the page cache through ``pread`` or a mapping."""
    _evict(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        if how == "pread":
            buf = memoryview(bytearray(16 << 20))
            offset = 0
            while offset < size:
                offset += os.preadv(fd, [buf], offset) or size
        else:
            with mmap.mmap(fd, size, prot=mmap.PROT_READ) as mapping:
                sum(mapping[i] for i in range(0, size, mmap.PAGESIZE))
    finally:
        os.close(fd)


def _file_huge_pages() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("FileHugePages:"):
                return int(line.split()[1]) * 1024
    return -1


def _median(fn: Callable[[], object], reps: int, before: Callable[[], None]) -> float:
    times = []
    for _ in range(reps):
        before()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label", default="", help="names the tree being measured")
    parser.add_argument("--dir", default="/tmp/torchkeep-verify-pass", help="where files go")
    parser.add_argument(
        "--fill",
        choices=["pread", "mmap", "load", "none"],
        default="none",
        help="evict the files, then read them back: pread, a mapping, or one verified load "
        "(the way a first load of the tree being measured leaves the page cache)",
    )
    parser.add_argument("--cold", action="store_true", help="evict before every run")
    parser.add_argument("--reps", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(2)
    model = build_model("llm", 0, True)
    os.makedirs(args.dir, exist_ok=True)
    path, peer = os.path.join(args.dir, "llm.tk"), os.path.join(args.dir, "llm.pt")
    if not os.path.exists(path):  # the same file for every tree of an A/B
        torchkeep.save(model.state_dict(), path)
        torch.save(model.state_dict(), peer)
    if args.fill in ("pread", "mmap"):
        _fill(path, args.fill)
        _fill(peer, args.fill)
    elif args.fill == "load":
        _evict(path)
        _evict(peer)
        torchkeep.load_state_dict(model, path)
        model.load_state_dict(torch.load(peer, mmap=True, weights_only=True))

    def before() -> None:
        if args.cold:
            _evict(path)
            _evict(peer)

    ops = {
        "verified": lambda: torchkeep.load_state_dict(model, path),
        "unverified": lambda: torchkeep.load_state_dict(model, path, verify=False),
        "torch_load_mmap": lambda: model.load_state_dict(
            torch.load(peer, mmap=True, weights_only=True)
        ),
        "verify": lambda: torchkeep.verify(path),
    }
    row: dict[str, object] = {
        "label": args.label,
        "torchkeep": os.path.dirname(torchkeep.__file__),
        "mode": "cold" if args.cold else f"warm, fill={args.fill}",
        "file_bytes": os.path.getsize(path),
        "file_huge_pages_before": _file_huge_pages(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if not args.cold:
        for fn in ops.values():  # warm up every path once
            fn()
    for name, fn in ops.items():
        row[name] = _median(fn, args.reps, before)
    ratio = float(row["torch_load_mmap"]) / float(row["verified"])  # type: ignore[arg-type]
    row["verified_vs_torch_load_mmap"] = ratio
    json.dump(row, sys.stdout)
    print()


if __name__ == "__main__":
    main()
