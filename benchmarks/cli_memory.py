"""Peak memory of ``torchkeep convert/verify/diff`` on a checkpoint of many large tensors.

Each command runs in a fresh interpreter that samples its own RssAnon (anonymous memory, what a
process really holds) and RssFile (memory-mapped file pages, reclaimable by the OS) every 5 ms;
figures are peaks above the interpreter's baseline after imports.

    .venv/bin/python benchmarks/cli_memory.py [--tensors 10] [--mb 40]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

PROBE = r"""
import sys, threading, time
from torchkeep.cli.main import cli

def rss():
    out = {}
    for line in open("/proc/self/status"):
        if line.startswith(("RssAnon", "RssFile")):
            key, value = line.split(":")
            out[key] = int(value.split()[0])
    return out

base = rss(); peak = dict(base); done = False
def sample():
    while not done:
        for key, value in rss().items():
            peak[key] = max(peak[key], value)
        time.sleep(0.005)
thread = threading.Thread(target=sample); thread.start()
start = time.perf_counter()
try:
    cli.main(sys.argv[1:], standalone_mode=False)
finally:
    done = True; thread.join()
anon = (peak['RssAnon'] - base['RssAnon']) // 1024
mapped = (peak['RssFile'] - base['RssFile']) // 1024
print(f"{anon} {mapped} "
      f"{time.perf_counter() - start:.2f}", file=sys.stderr)
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tensors", type=int, default=10)
    parser.add_argument("--mb", type=int, default=40, help="size of each float32 tensor")
    args = parser.parse_args()
    import safetensors.torch
    import torch

    with tempfile.TemporaryDirectory() as root:
        src = os.path.join(root, "big.safetensors")
        numel = args.mb * 1_000_000 // 4
        safetensors.torch.save_file(
            {f"layer{i}.weight": torch.randn(numel) for i in range(args.tensors)}, src
        )
        total = args.tensors * args.mb
        print(f"{args.tensors} tensors x {args.mb} MB = {total} MB checkpoint")
        print(f"{'command':<50} {'anon MB':>8} {'mapped MB':>10} {'seconds':>8}")
        j = lambda name: os.path.join(root, name)  # noqa: E731
        for cmd in (
            ["convert", src, j("a.tk")],
            ["convert", src, j("b.safetensors"), "--dtype", "bfloat16"],
            ["convert", src, j("shards"), "--max-shard-size", f"{3 * args.mb}MB"],
            ["convert", src, j("c.pt")],
            ["convert", j("c.pt"), j("d.safetensors")],
            ["verify", j("a.tk")],
            ["diff", src, j("a.tk")],
            ["inspect", j("a.tk"), "--json"],
        ):
            proc = subprocess.run(
                [sys.executable, "-c", PROBE, *cmd], capture_output=True, text=True, check=True
            )
            anon, mapped, secs = proc.stderr.strip().splitlines()[-1].split()
            shown = " ".join(os.path.basename(c) if os.sep in c else c for c in cmd)
            print(f"{shown:<50} {anon:>8} {mapped:>10} {secs:>8}")


if __name__ == "__main__":
    main()
