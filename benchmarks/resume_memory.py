"""Time and peak extra memory of resuming a training checkpoint into a live model.

Saves ``{"model": <LLM-like model>, "epoch": 1}`` with ``save_checkpoint``, then, in a fresh
interpreter holding an already materialized model, measures ``load_checkpoint``: wall time and
the process's peak RSS above its RSS before the call (``/proc/self/clear_refs`` resets the peak).

    .venv/bin/python benchmarks/resume_memory.py [--mb 512]
"""

from __future__ import annotations

import argparse
import gc
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from worker import _reset_peak, _status_kb  # noqa: E402
from workloads import build_model  # noqa: E402


def _save(path: str, nbytes: int) -> None:
    import torchkeep

    torchkeep.save_checkpoint(path, {"model": build_model("llm", nbytes, True), "epoch": 1})


def _load(path: str, nbytes: int) -> None:
    import torchkeep

    model = build_model("llm", nbytes, True)  # parameters already allocated and touched
    gc.collect()
    _reset_peak()
    rss0 = _status_kb("VmRSS")
    t0 = time.perf_counter()
    torchkeep.load_checkpoint(path, {"model": model, "epoch": 0})
    seconds = time.perf_counter() - t0
    extra = (_status_kb("VmHWM") - rss0) / 2**20
    size = os.path.getsize(path) / 2**20
    print(
        f"load_checkpoint: {seconds:.3f} s, peak extra RSS {extra:.0f} MB for a {size:.0f} MB file"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--mb", type=int, default=512, help="checkpoint size in MB (LLM-like shapes)")
    ap.add_argument("--step", choices=["save", "load"], help=argparse.SUPPRESS)
    ap.add_argument("--path", help=argparse.SUPPRESS)
    args = ap.parse_args()
    nbytes = args.mb << 20
    if args.step == "save":
        return _save(args.path, nbytes)
    if args.step == "load":
        return _load(args.path, nbytes)
    with tempfile.TemporaryDirectory(dir=os.getcwd()) as tmp:
        path = os.path.join(tmp, "ckpt.tk")
        for step in ("save", "load"):
            cmd = [sys.executable, __file__, "--step", step, "--path", path, "--mb", str(args.mb)]
            subprocess.run(cmd, check=True)


if __name__ == "__main__":
    main()
