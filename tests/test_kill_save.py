"""Crash consistency: SIGKILL during save leaves the old or the new file, never a mix.

A *zygote* subprocess imports torch once and forks a fresh writer per trial, so each trial costs
a fork instead of a Python start. Writers either loop over saves until killed at a random moment
(random trials) or kill themselves at a chosen file operation (deterministic crash points).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

import torchkeep
from torchkeep.storage import is_temp, sweep_temps

NUMEL = 1 << 20  # 8 tensors of 4 MiB: a 32 MiB checkpoint

ZYGOTE = textwrap.dedent(
    """
    import mmap, os, signal, sys
    import torch, torchkeep
    from torchkeep.storage.io import FileOps, use_ops

    NUMEL = int(sys.argv[1])

    def obj(gen):
        state = {f"layer{i}.weight": torch.full((NUMEL,), float(gen)) for i in range(8)}
        return {"gen": gen, "tag": f"gen-{gen}", "model_state": state}

    class CrashAt(FileOps):
        def __init__(self, op, nth):
            self.op, self.left = op, nth
        def _hit(self, op):
            if op == self.op:
                self.left -= 1
                if self.left <= 0:
                    os.kill(os.getpid(), signal.SIGKILL)
        def pwrite(self, fd, data, offset):
            self._hit("pwrite")
            return super().pwrite(fd, data, offset)
        def fsync(self, fd):
            self._hit("fsync")
            super().fsync(fd)
        def replace(self, src, dst):
            self._hit("replace")
            super().replace(src, dst)
        def fsync_dir(self, path):
            self._hit("fsync_dir")
            super().fsync_dir(path)

    class Phase(FileOps):
        # Byte 1 of the shared flag file: this save's I/O has begun (its temp file exists).
        def __init__(self, flag):
            self.flag = flag
        def open_new(self, path):
            self.flag[1] = 1
            return super().open_new(path)

    def child(words):
        if words[0] == "loop":
            path, gen, flag_path = words[1], int(words[2]), words[3]
            fd = os.open(flag_path, os.O_RDWR)
            flag = mmap.mmap(fd, 2)  # MAP_SHARED: the test reads it after the kill
            while True:
                gen += 1
                flag[1] = 0
                flag[0] = 1  # byte 0: inside torchkeep.save
                with use_ops(Phase(flag)):
                    torchkeep.save(obj(gen), path)
                flag[0] = 0
        path, gen, op, nth = words[1], int(words[2]), words[3], int(words[4])
        with use_ops(CrashAt(op, nth)):
            torchkeep.save(obj(gen), path)

    for line in sys.stdin:
        words = line.split()
        if words[0] == "reap":
            os.waitpid(int(words[1]), 0)
            print("reaped", flush=True)
            continue
        pid = os.fork()
        if pid == 0:
            try:
                child(words)
            finally:
                os._exit(0)
        print(pid, flush=True)
    """
)


class Zygote:
    def __init__(self) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", ZYGOTE, str(NUMEL)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )

    def ask(self, line: str) -> str:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline().strip()
        assert answer, "zygote died"
        return answer

    def spawn(self, *words: object) -> int:
        return int(self.ask(" ".join(map(str, words))))

    def reap(self, pid: int) -> None:
        assert self.ask(f"reap {pid}") == "reaped"

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


@pytest.fixture(scope="module")
def zygote():
    z = Zygote()
    yield z
    z.close()


def generation(gen: int) -> dict:
    """What the writers save (same as the zygote's ``obj``)."""
    state = {f"layer{i}.weight": torch.full((NUMEL,), float(gen)) for i in range(8)}
    return {"gen": gen, "tag": f"gen-{gen}", "model_state": state}


def check_consistent(path, min_gen: int) -> int:
    """The file at ``path`` is one whole generation, verified; returns that generation."""
    out = torchkeep.load(path)
    gen = out["gen"]
    assert gen >= min_gen and out["tag"] == f"gen-{gen}"
    assert len(out["model_state"]) == 8
    for value in out["model_state"].values():
        assert value.shape == (NUMEL,) and bool((value == gen).all())
    assert torchkeep.verify(path) == []
    return gen


def sweep_and_check(directory, target: str) -> int:
    """Leftovers are all temporaries; sweeping removes them. Returns how many there were."""
    leftovers = [n for n in os.listdir(directory) if n != target]
    assert all(is_temp(n) for n in leftovers), leftovers
    removed = sweep_temps(str(directory))
    assert sorted(os.path.basename(p) for p in removed) == sorted(leftovers)
    assert os.listdir(directory) == [target]
    return len(leftovers)


def _wait_for_first_save(flag, limit: float = 60.0) -> None:
    """Until the child is inside its first save (byte 0 of the flag), at most ``limit`` s."""
    deadline = time.monotonic() + limit
    while flag.read_bytes()[:1] != b"\1" and time.monotonic() < deadline:
        time.sleep(0.002)


def test_random_sigkill_during_repeated_saves(tmp_path, zygote, long_run):
    path = tmp_path / "ckpt.tk"
    torchkeep.save(generation(0), path)
    rng = random.Random(1234)
    flag = tmp_path.parent / f"{tmp_path.name}.flag"  # outside the checked directory
    gen, temps_seen, landed, trials = 0, 0, 0, 60 if long_run else 15
    for _ in range(trials):
        flag.write_bytes(b"\0\0")
        pid = zygote.spawn("loop", path, gen, flag)
        _wait_for_first_save(flag)  # a loaded machine may take long to start the child
        time.sleep(rng.uniform(0.0, 0.3))  # a random moment, not an assertion on time
        os.kill(pid, signal.SIGKILL)
        zygote.reap(pid)
        landed += flag.read_bytes() == b"\1\1"  # inside a save, after its temp file opened
        gen = check_consistent(path, gen)
        temps_seen += sweep_and_check(tmp_path, path.name)
    print(f"{trials} kills ({landed} mid-save), final generation {gen}, {temps_seen} swept")
    # The kills must interrupt saves in progress, not only the gaps between them.
    assert landed >= trials // 4, f"only {landed} of {trials} kills landed mid-save"


@pytest.mark.parametrize(
    "op, nth, committed",
    [
        ("pwrite", 1, False),  # header placeholder not even written
        ("pwrite", 3, False),  # in the middle of the data
        ("fsync", 1, False),  # everything written, nothing durable yet
        ("replace", 1, False),  # durable temp, not yet renamed
        ("fsync_dir", 1, True),  # renamed: the new file is what readers see
    ],
)
def test_crash_at_each_step(tmp_path, zygote, op, nth, committed):
    path = tmp_path / "ckpt.tk"
    torchkeep.save(generation(1), path)
    pid = zygote.spawn("crash", path, 2, op, nth)
    zygote.reap(pid)
    assert check_consistent(path, 1) == (2 if committed else 1)
    leftovers = sweep_and_check(tmp_path, path.name)
    assert leftovers == (0 if committed else 1)


def test_sweep_keeps_live_writers_temps(tmp_path):
    from torchkeep.storage.local import temp_name

    mine = temp_name(str(tmp_path / "x.tk"))
    open(mine, "wb").close()
    assert is_temp(os.path.basename(mine))
    assert sweep_temps(str(tmp_path)) == []
    assert os.path.exists(mine)
