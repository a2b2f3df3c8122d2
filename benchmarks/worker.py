"""One benchmark subprocess: build a workload, run one contender family's ops, print JSON lines.

Run by ``run.py`` in a fresh interpreter per (repetition, workload, family), so peak RSS is the
family's own. Before each op the kernel's peak-RSS counter is reset (``/proc/self/clear_refs``),
so "peak extra RSS" is the op's high-water mark minus the RSS it started from. Each load is run
once more, untimed, to split that peak into private (anonymous) and file-mapped pages
(``memory_split``): a loader that maps the file holds page-cache pages, not memory of its own.

The family ``side-by-side`` is the exception: one process writes every family's file and then
times all their warm loads in rounds, the order rotated each round (``side_by_side``).
"""

from __future__ import annotations

import gc
import json
import mmap
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from contenders import (  # noqa: E402
    FAMILIES,
    RELEASE_HOOKS,
    copy_floor,
    drop_cache,
    remove,
    warm_cache,
)
from memsplit import peak_split  # noqa: E402
from report import COPY_FLOOR  # noqa: E402
from workloads import add_optimizer, build_model, checkpoint_bytes  # noqa: E402


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def prefault(nbytes: int) -> None:
    """Touch and release ``nbytes`` of memory so the next op starts from host-backed pages.

    On the VMs this benchmark runs on, memory the guest frees is soon handed back to the host
    (free page reporting), and the next first touch of a page costs ~1-3 s per GB, 10-30x bare
    metal. A save then pays that for every page-cache page it fills and every copy it makes, and
    results depend on the VM's state more than on the code. Touching and releasing twice the
    checkpoint size just before each op puts backed pages on the free lists for every contender
    alike. Opt-in (``run.py --prefault``): it also changes the timing of the host's reclaim, and
    docs/performance.md shows runs with and without it.
    """
    if nbytes <= 0:
        return
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_POPULATE", 0)
    buf = mmap.mmap(-1, nbytes, flags=flags)
    try:
        if not getattr(mmap, "MAP_POPULATE", 0):
            for offset in range(0, nbytes, mmap.PAGESIZE):
                buf[offset] = 1
    finally:
        buf.close()


PREFAULT = {"bytes": 0}  # set by main() from the job spec


def measure(fn, *args) -> dict:
    """Time ``fn(*args)`` and its peak RSS above the starting RSS."""
    prefault(PREFAULT["bytes"])
    gc.collect()
    exact = _reset_peak()
    rss0 = _status_kb("VmRSS")
    t0 = time.perf_counter()
    extra = fn(*args)
    seconds = time.perf_counter() - t0
    peak = _status_kb("VmHWM")
    out = {"seconds": seconds, "peak_extra": max(0, peak - rss0) if exact else None}
    out.update(extra or {})
    return out


def memory_split(fn, target, obj, path: str, cache: str) -> dict:
    """One more, untimed, run of a load from the same cache state, sampling its peak private
    (anonymous) and file-mapped memory apart (:mod:`memsplit`); the timed run stays unsampled."""
    warm_cache(path)
    if cache == "cold":
        drop_cache(path)
    gc.collect()
    return peak_split(fn, target, obj, path, hooks=RELEASE_HOOKS)


def lazy_access(path: str, key: str) -> dict:
    """Open a file lazily and read one named tensor; median of 21 tries (warm cache)."""
    from safetensors import safe_open

    import torchkeep

    def tk() -> None:
        with torchkeep.open_file(path) as reader:
            reader.read_entry(key)

    def tk_map() -> None:
        with torchkeep.open_file(path) as reader:
            reader.map_entry(key)

    def st() -> None:
        with safe_open(path, "pt") as f:
            f.get_tensor(key)

    out = {}
    for name, fn in (
        ("torchkeep.open_file+read_entry", tk),
        ("torchkeep.open_file+map_entry", tk_map),
        ("safetensors.safe_open+get_tensor", st),
    ):
        times = []
        for _ in range(21):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        out[name] = statistics.median(times)
    return out


def preimport() -> None:
    """Import every contender's modules before timing: an import is a once-per-process cost,
    not part of a save (torch.save's module is imported with torch itself)."""
    import safetensors.torch  # noqa: F401
    import torch.distributed.checkpoint  # noqa: F401

    import torchkeep  # noqa: F401


def prime_cold(path: str) -> None:
    """One untimed cold read of the file before the timed cold loads of a process.

    On the benchmark VM the first cold read of a process is at times 0.6-1.0 s where every
    later one takes 0.35-0.45 s, whichever op comes first (measured by swapping the order);
    without this, the family whose only load op is always first (``load_file``, ``dcp.load``)
    paid it in every repetition.
    """
    warm_cache(path)
    drop_cache(path)
    warm_cache(path)


#: Family name of the process that times every family's warm loads side by side.
SIDE_BY_SIDE = "side-by-side"


def emit_row(spec: dict, nbytes: int, op: str, kind: str, result: dict, cache: str = "") -> None:
    """Print one result row as a JSON line (read by ``run.py``)."""
    row = {"workload": spec["workload"], "size": spec.get("size", 0), "family": spec["family"]}
    row.update(op=op, kind=kind, bytes=nbytes, cache=cache, **result)
    print(json.dumps(row), flush=True)


def file_path(spec: dict, family: str) -> str:
    return os.path.join(
        spec["dir"], f"{spec['workload']}{spec.get('size', '')}{FAMILIES[family][0]}"
    )


def side_by_side(spec: dict) -> None:
    """Warm loads of every family in one process, in ``rounds`` rounds, the order rotated.

    A warm load of the LLM-like model is a ~70 ms memory-bandwidth copy, and this VM's copy
    speed swings by up to 2x in episodes of ~10 s, longer than one family's process. Timed in
    separate processes, a family's warm loads fall in whatever episode its process met; timed
    here, every contender meets the same episodes. Seconds only: peak RSS of the same loads is
    measured in each family's own process (memory freed by one contender would hide another's).
    """
    preimport()
    model = build_model(spec["workload"], spec.get("size", 0), fill=True)
    obj = model.state_dict()
    nbytes = checkpoint_bytes(obj)
    entries = []
    for family in spec["load_families"]:
        _, saves, loads = FAMILIES[family]
        path = file_path(spec, family)
        remove(path)
        next(iter(saves.values()))(obj, path)  # untimed: the file the loads read
        entries.extend((op, fn, path) for op, fn in loads.items())
    rounds = spec.get("rounds", 5)
    for r in range(rounds):
        shift = (spec.get("rep", 0) * rounds + r) % len(entries)
        for op, fn, path in entries[shift:] + entries[:shift]:
            warm_cache(path)
            result = measure(fn, model, obj, path)
            result.update(peak_extra=None, side_by_side=True)
            emit_row(spec, nbytes, op, "load", result, "warm")
    for path in {path for _, _, path in entries}:
        remove(path)


def main(spec: dict) -> None:
    if spec["family"] == SIDE_BY_SIDE:
        side_by_side(spec)
        return
    preimport()
    workload, family = spec["workload"], spec["family"]
    model = build_model(workload, spec.get("size", 0), fill=True)
    obj = add_optimizer(model) if workload == "optim" else model.state_dict()
    nbytes = checkpoint_bytes(obj)
    if spec.get("prefault"):
        PREFAULT["bytes"] = min(max(2 * nbytes, 64 << 20), 8 << 30)
    _, saves, loads = FAMILIES[family]
    path = file_path(spec, family)

    def emit(op: str, kind: str, result: dict, cache: str = "") -> None:
        emit_row(spec, nbytes, op, kind, result, cache)

    only, skip = spec.get("ops"), spec.get("skip", [])
    for op, fn in saves.items():
        if (only and op not in only) or op in skip:
            continue
        remove(path)
        emit(op, "save", measure(fn, obj, path))
        if op == "torchkeep.save_async":
            emit(COPY_FLOOR, "floor", copy_floor(obj))
    if spec.get("lazy"):
        for op, seconds in lazy_access(path, spec["lazy"]).items():
            emit(op, "lazy", {"seconds": seconds, "peak_extra": None})
    target = None if workload == "optim" else model
    if workload == "optim":
        # Save-only: without a consumer, mmap-backed peers (torch.load mmap, load_file) would
        # "load" without touching a byte; the load targets are measured on LLM-like.
        loads = {}
    # A family's load ops take turns going first (a fixed order would charge any first-op
    # cost to the same op in every repetition).
    names = list(loads)
    shift = spec.get("rep", 0) % max(1, len(names))
    loads = {name: loads[name] for name in names[shift:] + names[:shift]}
    for cache in spec.get("caches", ["warm"]):
        if cache == "cold" and loads:
            prime_cold(path)
        for op, fn in loads.items():
            if only and op not in only:
                continue
            warm_cache(path)  # cold: read once first, so every op finds the host side alike
            if cache == "cold":
                drop_cache(path)
            result = measure(fn, target, obj, path)
            result.update(memory_split(fn, target, obj, path, cache))
            emit(op, "load", result, cache)
    if not spec.get("keep"):
        remove(path)


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
