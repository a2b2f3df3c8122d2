"""Time the first ``torchkeep.save`` of fresh processes under different write settings.

A save's first run in a process is what a training job sees (and what ``make bench``
measures); settings are interleaved so the machine's drift hits them alike. Each setting is a
set of ``TORCHKEEP_<KNOB>=value`` overrides; the default compares direct-I/O write sizes with
the buffered path.

    python benchmarks/first_save.py                      # 1.22 GB LLM-shaped, 7 rounds
    python benchmarks/first_save.py --mb 256 --rounds 5
    python benchmarks/first_save.py --setting DIRECT_IO=0 --setting DIRECT_CHUNK_BYTES=4194304
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
MB = 1 << 20
DEFAULT_SETTINGS = [
    "DIRECT_CHUNK_BYTES=1048576",
    "DIRECT_CHUNK_BYTES=2097152",
    "DIRECT_CHUNK_BYTES=8388608",
    "DIRECT_IO=0",
]


def child(mb: int, path: str) -> None:
    """Build the workload, save it once, print the seconds."""
    sys.path.insert(0, HERE)
    from workloads import build_model

    import torchkeep

    state = build_model("scale", mb * MB, fill=True).state_dict()
    started = time.perf_counter()
    torchkeep.save(state, path)
    print(json.dumps({"seconds": time.perf_counter() - started}))


def one(mb: int, setting: str, directory: str) -> float:
    env = dict(os.environ)
    for pair in filter(None, setting.split(",")):
        knob, value = pair.split("=", 1)
        env[f"TORCHKEEP_{knob}"] = value
    path = os.path.join(directory, "first.tk")
    cmd = [sys.executable, __file__, "--child", str(mb), path]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    os.unlink(path)
    return json.loads(out.strip().splitlines()[-1])["seconds"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--mb", type=int, default=1220, help="checkpoint size in MiB")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--setting", action="append", help="KNOB=value[,KNOB=value] (repeatable)")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(int(args.child[0]), args.child[1])
        return
    settings = args.setting or DEFAULT_SETTINGS
    times: dict[str, list[float]] = {s: [] for s in settings}
    with tempfile.TemporaryDirectory(dir=os.getcwd()) as directory:
        for _ in range(args.rounds):
            for setting in settings:
                times[setting].append(one(args.mb, setting, directory))
    for setting, seconds in times.items():
        print(
            f"{setting:40s} median {statistics.median(seconds):.3f} s  best {min(seconds):.3f} s"
            f"  ({args.mb} MiB, {args.rounds} fresh processes)"
        )


if __name__ == "__main__":
    main()
