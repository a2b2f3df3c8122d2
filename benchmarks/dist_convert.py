"""Consolidating a sharded checkpoint (``torchkeep convert``): wall time and peak RSS.

Two gloo ranks on CPU save an FSDP2-sharded model (LAYERS x WIDTH x WIDTH fp32: every tensor
split between the two rank files); then ``torchkeep convert STEP out.safetensors`` runs in a
fresh process with 1 and with 4 I/O threads (chunks of one tensor from different rank files are
read and verified in parallel), each with its page cache warm and evicted. Peak RSS is the
child's ru_maxrss, next to its\nru_maxrss right after importing torch and torchkeep.

    PYTHONPATH=$PWD/src:$PWD/tests python benchmarks/dist_convert.py --layers 24 --width 2048
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from _dist_workers import launch, values


def save_sharded(rank: int, world: int, root: str, layers: int, width: int) -> int:
    import torch
    from torch import nn
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import torchkeep.distributed as tkd

    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(width, width, bias=False) for _ in range(layers)])
    mesh = init_device_mesh("cpu", (world,))
    for layer in model:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    tkd.save({"model": model}, os.path.join(root, "step"), rng=False)
    return sum(p.numel() * 4 for p in model.parameters())


def evict(folder: str) -> None:
    for name in os.listdir(folder):
        fd = os.open(os.path.join(folder, name), os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def convert(step: str, out: str, threads: int) -> dict:
    env = dict(os.environ, TORCHKEEP_IO_THREADS=str(threads))
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, step, out], check=True, env=env, capture_output=True
    )
    seconds = time.perf_counter() - start
    base, peak = (int(x) for x in done.stdout.split()[-2:])
    os.remove(out)
    return {
        "seconds": round(seconds, 2),
        "peak_rss_mb": round(peak / 1024),
        "rss_after_imports_mb": round(base / 1024),
    }


# The child: peak RSS after the imports (baseline), then after the conversion.
_CHILD = """
import resource, sys
import torch.distributed.checkpoint
from torchkeep.cli.main import cli
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    cli.main(["convert", sys.argv[1], sys.argv[2]], standalone_mode=False)
finally:
    print(base, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--width", type=int, default=2048)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR", "/tmp")) as root:
        (nbytes, _) = values(launch(save_sharded, 2, root, "s", args.layers, args.width))
        step = os.path.join(root, "step")
        out = os.path.join(root, "out.safetensors")
        rows = []
        for cache in ("warm", "cold"):
            for threads in (1, 4):
                if cache == "cold":
                    evict(step)
                row = convert(step, out, threads)
                row.update(cache=cache, threads=threads, model_mb=nbytes >> 20)
                rows.append(row)
                print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
