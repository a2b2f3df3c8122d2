"""The contenders: one function per (library, operation), each timed by the worker.

Saves include making the file durable: torchkeep fsyncs itself; ``torch.save`` and
``safetensors.save_file`` do not, so their file (and directory) is fsynced inside the timed
region; DCP's filesystem writer fsyncs by default (``sync_files=True``). Async saves report the
time the caller was blocked and, as their seconds, the time from the call until the checkpoint
was durable, both medians of ``ASYNC_SAMPLES`` steady-state saves of the process (a first,
untimed, save warms the staging memory); their peak RSS covers every save.
"""

from __future__ import annotations

import os
import shutil
import statistics
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from ceiling import device_ceiling
from report import BUFFERED_WRITE, DEVICE_CEILING
from torch import nn
from workloads import checkpoint_bytes, flatten

warnings.filterwarnings("ignore")  # DCP warns that it runs without a process group

SaveFn = Callable[[Any, str], dict]
LoadFn = Callable[[nn.Module, Any, str], dict]

#: Steady-state async saves timed per process, after the warm-up save. The blocked time is a
#: ~50 ms memory copy, and this VM's copy speed swings by up to 2x from one second to the next:
#: one save per process (up to run X) made the cell a median of three single draws.
ASYNC_SAMPLES = 5


def fsync_path(path: str) -> None:
    """fsync a file (or every file of a directory) and its parent directory."""
    paths = [path]
    if os.path.isdir(path):
        paths = [os.path.join(path, n) for n in os.listdir(path)] + [path]
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _files(path: str) -> list[str]:
    """The file itself, or a directory's files (DCP and sharded checkpoints)."""
    return [os.path.join(path, n) for n in os.listdir(path)] if os.path.isdir(path) else [path]


def drop_cache(path: str) -> None:
    """Evict a file's (or a directory's files') pages from the page cache.

    Only the guest's cache: on a VM the disk is itself a file on the host, whose cache the
    guest cannot drop. The worker reads the file through before evicting it, so every cold
    load finds the host side in the same state; otherwise the first cold load of each
    contender family paid for the host's cache and the second one did not.
    """
    for p in _files(path):
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def warm_cache(path: str) -> None:
    """Read a file (or a directory's files) once, so its pages are in the page cache.

    A save does not always leave them there: torchkeep writes large files with direct I/O,
    which bypasses the cache. Warm loads of every contender start from this same state.
    """
    buffer = bytearray(8 << 20)
    for p in _files(path):
        with open(p, "rb", buffering=0) as f:
            while f.readinto(buffer):
                pass


def remove(path: str) -> None:
    """Remove a file or a directory (DCP's checkpoints), if it exists."""
    if os.path.isdir(path):
        shutil.rmtree(path)
    elif os.path.exists(path):
        os.unlink(path)


# ------------------------------------------------------------------------------------ saves


def save_device_ceiling(obj: Any, path: str) -> dict:
    """The device's write limit for this many bytes (:mod:`ceiling`: O_DIRECT threads, fsync).

    The (threads, block) sweep runs once per benchmark run, its choice kept next to the
    checkpoints; the row's seconds are the final full-size write only.
    """
    setting = os.path.join(os.path.dirname(os.path.abspath(path)), "ceiling-setting.json")
    result = device_ceiling(path, checkpoint_bytes(obj), setting_file=setting)
    result["peak_extra"] = None  # its own write buffers (and a sweep's): no memory claim
    return result


def save_buffered(obj: Any, path: str) -> dict:
    """The same bytes, from memory, with a plain buffered os.write loop + fsync (up to run AF
    this was reported as the "disk ceiling"; it is no ceiling: it pays the page-cache copy)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for t in flatten(obj).values():
            view = memoryview(t.detach().reshape(-1).view(torch.uint8).numpy())
            while view.nbytes:
                view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    return {}


def save_torchkeep(obj: Any, path: str) -> dict:
    import torchkeep

    torchkeep.save(obj, path)
    return {}


def time_async_saves(start: Callable[[str], Callable[[], Any]], path: str) -> dict:
    """Blocked and call-to-durable times of ``ASYNC_SAMPLES`` steady-state async saves.

    ``start(path)`` begins one save and returns a function that waits until it is durable.
    A first, untimed, save warms the staging memory, as every save after the first does in a
    training loop. Each save writes a path that does not exist yet, like a manager's new step.
    """
    start(path + ".warmup")()
    remove(path + ".warmup")
    blocked, seconds = [], []
    for _ in range(ASYNC_SAMPLES):
        remove(path)
        t0 = time.perf_counter()
        finish = start(path)
        blocked.append(time.perf_counter() - t0)
        finish()
        seconds.append(time.perf_counter() - t0)
    return {
        "blocked": statistics.median(blocked),
        "blocked_samples": blocked,
        "seconds": statistics.median(seconds),
    }


def save_torchkeep_async(obj: Any, path: str) -> dict:
    import torchkeep

    return time_async_saves(lambda p: torchkeep.save_async(obj, p).wait, path)


def timed_copy(tensors: list[torch.Tensor], buffer: torch.Tensor) -> float:
    """Seconds to copy the flat byte tensors one after another into ``buffer`` (a snapshot as
    ``Tensor.copy_`` makes it: torch's threads split each tensor in fixed shares)."""
    t0 = time.perf_counter()
    offset = 0
    for t in tensors:
        buffer[offset : offset + t.numel()].copy_(t)
        offset += t.numel()
    return time.perf_counter() - t0


def copy_floor(obj: Any) -> dict:
    """The snapshot a plain copy makes: ``Tensor.copy_`` of the same tensors into a reused
    buffer, with ordinary cached stores; the median of ``ASYNC_SAMPLES`` copies after an untimed
    one, as the async saves are timed. Measured in the same process right after ``save_async``,
    so that both see the host's memory bandwidth of that moment, which on the benchmark VM
    swings by 2x. torchkeep's snapshot uses streaming stores where it can (``memcopy.py``)."""
    tensors = [t.detach().reshape(-1).view(torch.uint8) for t in flatten(obj).values()]
    buffer = torch.empty(sum(t.numel() for t in tensors), dtype=torch.uint8)
    timed_copy(tensors, buffer)
    copies = [timed_copy(tensors, buffer) for _ in range(ASYNC_SAMPLES)]
    return {"seconds": statistics.median(copies), "peak_extra": None}


def save_torch(obj: Any, path: str) -> dict:
    torch.save(obj, path)
    fsync_path(path)
    return {}


def save_safetensors(obj: Any, path: str) -> dict:
    from safetensors.torch import save_file

    save_file(flatten(obj), path)
    fsync_path(path)
    return {}


def save_dcp(obj: Any, path: str) -> dict:
    import torch.distributed.checkpoint as dcp

    dcp.save(obj, checkpoint_id=path)
    fsync_path(path)  # directory entries; DCP fsyncs its files itself
    return {}


def save_dcp_async(obj: Any, path: str) -> dict:
    """Measured like torchkeep's (``time_async_saves``); the directory is fsynced at the end."""
    import torch.distributed.checkpoint as dcp

    def start(p: str) -> Callable[[], None]:
        future = dcp.async_save(obj, checkpoint_id=p)

        def finish() -> None:
            future.result()
            fsync_path(p)

        return finish

    return time_async_saves(start, path)


# ------------------------------------------------------------------------------------ loads


#: Called by a load just before it frees what it loaded (``memsplit.peak_split`` samples
#: memory there); empty, and so free, in timed runs.
RELEASE_HOOKS: list[Callable[[], None]] = []


def _before_release() -> None:
    for hook in RELEASE_HOOKS:
        hook()


def load_torchkeep(verify: bool) -> LoadFn:
    def run(model: nn.Module, obj: Any, path: str) -> dict:
        import torchkeep

        if model is None:  # whole-object load (checkpoint with optimizer)
            state = torchkeep.load(path, verify=verify)
            _before_release()
            del state
        else:
            torchkeep.load_state_dict(model, path, verify=verify)
            _before_release()
        return {}

    return run


def load_torch(mmap: bool) -> LoadFn:
    def run(model: nn.Module, obj: Any, path: str) -> dict:
        state = torch.load(path, mmap=mmap, weights_only=True)
        if model is not None:
            model.load_state_dict(state)
        _before_release()
        del state
        return {}

    return run


def load_safetensors(model: nn.Module, obj: Any, path: str) -> dict:
    from safetensors.torch import load_file

    state = load_file(path)
    if model is not None:
        model.load_state_dict(state)
    _before_release()
    del state
    return {}


def load_dcp(model: nn.Module, obj: Any, path: str) -> dict:
    import torch.distributed.checkpoint as dcp

    dcp.load(model.state_dict(), checkpoint_id=path)  # in place into the model's tensors
    return {}


#: family -> (file suffix, {save op name: fn}, {load op name: fn})
FAMILIES: dict[str, tuple[str, dict[str, SaveFn], dict[str, LoadFn]]] = {
    "ceiling": (
        ".bin",
        {DEVICE_CEILING: save_device_ceiling, BUFFERED_WRITE: save_buffered},
        {},
    ),
    "torchkeep": (
        ".tk",
        {"torchkeep.save": save_torchkeep, "torchkeep.save_async": save_torchkeep_async},
        {
            "torchkeep verify=False": load_torchkeep(False),
            "torchkeep verify=True": load_torchkeep(True),
        },
    ),
    "torch": (
        ".pt",
        {"torch.save": save_torch},
        {"torch.load": load_torch(False), "torch.load mmap=True": load_torch(True)},
    ),
    "safetensors": (
        ".safetensors",
        {"safetensors.save_file": save_safetensors},
        {"safetensors.load_file": load_safetensors},
    ),
    "dcp": (
        ".dcp",
        {"dcp.save": save_dcp, "dcp.async_save": save_dcp_async},
        {"dcp.load": load_dcp},
    ),
}
