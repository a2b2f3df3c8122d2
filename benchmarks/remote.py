"""Remote storage benchmark (issue 19): save and load of the LLM-like workload against a local
S3 server (moto, a subprocess on 127.0.0.1), torchkeep vs torch.save into an fsspec file object
vs DCP's FsspecWriter/FsspecReader vs safetensors bytes uploaded with s3fs; peak extra RSS per
operation (each row in a fresh subprocess); the two-tier manager's blocked time per step.

    python benchmarks/remote.py [--size-mb 384] [--reps 2] [--out benchmarks/results/remote.jsonl]

moto is a pure-Python server: absolute speeds are moto's, far below a real object store; the
ratios compare clients over the same server. Rows are JSONL (one object per measurement).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
MB = 1 << 20
FAMILIES = ["torchkeep", "torch", "dcp", "safetensors"]
ENV = {
    "AWS_ACCESS_KEY_ID": "bench",
    "AWS_SECRET_ACCESS_KEY": "bench",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def _rss_mb() -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _fs():
    import s3fs

    return s3fs.S3FileSystem()


def one(family: str, op: str, url: str, size: int) -> dict:
    """Run one save or load in this (fresh) process; returns seconds and peak extra RSS."""
    import safetensors.torch  # noqa: F401  (every client imported and connected before the
    import torch
    import torch.distributed.checkpoint  # noqa: F401  baseline: RSS counts the operation only)
    from workloads import build_model

    import torchkeep  # noqa: F401

    _fs().ls(url.split("/")[2])
    model = build_model("llm", size, fill=op == "save")
    state = model.state_dict()
    if op == "load":  # fault the destination pages in: RSS then counts the load's own memory
        for tensor in state.values():
            tensor.zero_()
    base = _rss_mb()
    t0 = time.perf_counter()
    if family == "torchkeep":
        import torchkeep

        if op == "save":
            torchkeep.save(state, url)
        else:
            torchkeep.load_state_dict(model, url)
    elif family == "torch":
        fs = _fs()
        if op == "save":
            with fs.open(url, "wb") as handle:
                torch.save(state, handle)
        else:
            with fs.open(url, "rb") as handle:
                model.load_state_dict(torch.load(handle, weights_only=True))
    elif family == "safetensors":
        from safetensors.torch import load, save

        fs = _fs()
        if op == "save":
            fs.pipe_file(url, save(state))
        else:
            model.load_state_dict(load(fs.cat_file(url)))
    elif family == "dcp":
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter

        if op == "save":
            dcp.save(state, storage_writer=FsspecWriter(url, sync_files=False), no_dist=True)
        else:
            dcp.load(state, storage_reader=FsspecReader(url), no_dist=True)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "extra_rss_mb": max(0.0, _peak_mb() - base)}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start_moto() -> tuple[subprocess.Popen, str]:
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, endpoint
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("moto server did not start")


def _run_one(family: str, op: str, url: str, size: int, env: dict) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--one", family, op, url, str(size)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def two_tier(size: int, url: str, steps: int = 3) -> dict:
    """Blocked time per save: local manager vs two-tier manager (upload in the background)."""
    from workloads import build_model

    from torchkeep import CheckpointManager

    model = build_model("llm", size, fill=True)
    out = {}
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        for name, kwargs in (
            ("local", {}),
            ("two-tier", {"replicate_to": url}),
        ):
            times = []
            with CheckpointManager(os.path.join(tmp, name), rng=False, **kwargs) as mgr:
                for step in range(steps):
                    t0 = time.perf_counter()
                    mgr.save(step, {"model": model})
                    times.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                mgr.wait_replication()
                out[f"{name}_drain_s"] = time.perf_counter() - t0
            out[f"{name}_blocked_s"] = statistics.median(times)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--one", nargs=4, help=argparse.SUPPRESS)
    parser.add_argument("--size-mb", type=int, default=384)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--no-tiers", action="store_true", help="skip the two-tier rows")
    parser.add_argument("--out", default=os.path.join(HERE, "results", "remote.jsonl"))
    args = parser.parse_args()
    if args.one:
        family, op, url, size = args.one
        print(json.dumps(one(family, op, url, int(size))))
        return
    proc, endpoint = _start_moto()
    env = {**os.environ, **ENV, "AWS_ENDPOINT_URL": endpoint}
    os.environ.update(env)
    size = args.size_mb * MB
    rows = []
    try:
        import s3fs

        bucket = f"bench-{uuid.uuid4().hex[:8]}"
        s3fs.S3FileSystem().mkdir(bucket)
        families = args.families.split(",")
        for rep in range(args.reps):
            order = families[rep % len(families) :] + families[: rep % len(families)]
            for family in order:
                url = f"s3://{bucket}/{family}-{rep}" + (".tk" if family == "torchkeep" else "")
                for op in ("save", "load"):
                    row = _run_one(family, op, url, size, env)
                    row.update(family=family, op=op, rep=rep, size_mb=args.size_mb)
                    rows.append(row)
                    print(json.dumps(row), flush=True)
        tiers = None if args.no_tiers else two_tier(size, f"s3://{bucket}/tiers")
        if tiers is not None:
            tiers.update(op="two-tier", size_mb=args.size_mb)
            rows.append(tiers)
            print(json.dumps(tiers), flush=True)
    finally:
        proc.terminate()
        proc.wait()
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    with open(args.out, "a") as handle:
        for row in rows:
            handle.write(json.dumps({**row, "when": stamp}) + "\n")
    for op in ("save", "load"):
        for family in families:
            got = [r for r in rows if r.get("family") == family and r["op"] == op]
            secs = statistics.median(r["seconds"] for r in got)
            rss = max(r["extra_rss_mb"] for r in got)
            rate = args.size_mb / secs
            print(
                f"{op:5s} {family:12s} {secs:7.2f} s {rate:7.1f} MB/s  peak extra RSS {rss:6.0f} MB"
            )
    if tiers is None:
        return
    blocked, local = tiers["two-tier_blocked_s"], tiers["local_blocked_s"]
    print(f"two-tier blocked/step {blocked:.3f} s vs local {local:.3f} s", end="; ")
    print(f"replication drained in {tiers['two-tier_drain_s']:.1f} s")


if __name__ == "__main__":
    main()
