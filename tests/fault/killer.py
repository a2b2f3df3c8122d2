"""Crash campaigns run in one process that forks a child per trial (torch is imported once).

Usage: ``python killer.py KIND WORKDIR SEED MODE:TRIALS...`` prints JSON summaries. Modes:

* ``at_op``: the child crashes (``os._exit``) at I/O operation K of a save, for every K.
* ``random``: the child saves new versions in a loop and is SIGKILLed at a random moment; a
  flag shared with the child (:class:`faultlib.PhaseOps`) tells the parent whether the kill
  landed inside a save after its first I/O (counted as ``killed mid-save``).
* ``fsize``: the child saves under ``RLIMIT_FSIZE`` (SIGXFSZ ignored) swept over byte offsets;
  the save must fail with a StorageError and clean up its own temporaries.

After every trial the parent checks that the target holds complete committed versions only
(old or new), then that the next open sweeps every temporary the dead child left.
"""

from __future__ import annotations

import json
import os
import random
import resource
import signal
import sys
import threading
import time
import traceback

import torch
from faultlib import (
    CRASH_EXIT,
    IDLE,
    IN_SAVE,
    FaultOps,
    PhaseOps,
    landed_mid_save,
    new_phase_flag,
    temps_in,
)
from scenarios import check_after_fault, committed, is_step, save_version

import torchkeep
from torchkeep.manager import CheckpointManager
from torchkeep.storage.io import use_ops
from torchkeep.storage.local import sweep_temps

HANG_SECONDS = 120
OK, STORAGE_ERROR, OTHER_ERROR = 0, 3, 4


def _fork(body) -> int:
    """Run ``body()`` in a forked child; returns its pid. The child never returns."""
    if threading.active_count() != 1:
        raise RuntimeError("refusing to fork with threads running")
    pid = os.fork()
    if pid == 0:
        code = OTHER_ERROR
        try:
            body()
            code = OK
        except torchkeep.StorageError:
            code = STORAGE_ERROR
        except BaseException:  # noqa: BLE001 - reported through the exit code and stderr
            traceback.print_exc()
        finally:
            os._exit(code)
    return pid


def _wait(pid: int, kill_after: float | None = None) -> tuple[str, int]:
    """Wait for ``pid``; SIGKILL it after ``kill_after`` seconds. Returns (how, code)."""
    deadline = time.monotonic() + (kill_after if kill_after is not None else HANG_SECONDS)
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            if os.WIFSIGNALED(status):
                return "signal", os.WTERMSIG(status)
            return "exit", os.WEXITSTATUS(status)
        if time.monotonic() >= deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return ("killed", 9) if kill_after is not None else ("hang", 9)
        time.sleep(0.0005)


def _sweep_and_check(kind: str, target: str) -> None:
    """The next open must sweep what a dead writer left."""
    if is_step(kind):
        CheckpointManager(target, rng=False).close()
        left = temps_in(target)
    else:
        sweep_temps(os.path.dirname(target))
        left = temps_in(os.path.dirname(target))
    if left:
        raise AssertionError(f"temporaries left after the next open: {left}")


def _save_in_child(kind: str, target: str, version: int) -> None:
    """Save in a child, so the parent never starts the writer's threads (it forks later)."""
    how, code = _wait(_fork(lambda: save_version(kind, target, version)))
    if (how, code) != ("exit", OK):
        raise RuntimeError(f"setup save of version {version} failed: {how} {code}")


class Campaign:
    def __init__(self, kind: str, workdir: str, seed: int) -> None:
        self.kind = kind
        self.target = os.path.join(workdir, "run" if is_step(kind) else "ckpt.tk")
        self.rng = random.Random(seed)
        self.failures: list[str] = []
        self.outcomes: dict[str, int] = {}
        _save_in_child(kind, self.target, 1)
        self.current = 1

    def note(self, outcome: str) -> None:
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1

    def check(self, label: str, old: int, new: int, clean_already: bool = False) -> None:
        try:
            seen = check_after_fault(self.kind, self.target, old, new)
            if clean_already and temps_in(os.path.dirname(self.target)):
                raise AssertionError("the failed save left temporaries behind")
            _sweep_and_check(self.kind, self.target)
            self.current = max(seen)
        except Exception as exc:  # noqa: BLE001 - collected and reported
            self.failures.append(f"{label}: {exc}")
            self._reset()

    def _reset(self) -> None:
        self.current += 10
        target_dir = os.path.dirname(self.target)
        self.target = os.path.join(target_dir, f"reset{self.current}", "t")
        os.makedirs(os.path.dirname(self.target))
        _save_in_child(self.kind, self.target, self.current)

    def count_ops(self) -> int:
        recorder = FaultOps()
        marker = self.target + ".count"

        def body() -> None:
            with use_ops(recorder):
                save_version(self.kind, self.target, self.current + 1)
            with open(marker, "w") as handle:
                handle.write(str(recorder.counted))

        _wait(_fork(body))
        with open(marker) as handle:
            count = int(handle.read())
        os.unlink(marker)
        self.current += 1
        return count

    def at_op(self, repeats: int) -> int:
        trials = 0
        for _ in range(max(1, repeats)):
            total = self.count_ops()
            for k in range(total):
                old, new = self.current, self.current + 1
                injector = FaultOps(at=k, action="crash")

                def body(injector=injector, new=new) -> None:
                    with use_ops(injector):
                        save_version(self.kind, self.target, new)

                how, code = _wait(_fork(body))
                self.note(f"{how}:{code}")
                if (how, code) not in (("exit", CRASH_EXIT), ("exit", OK)):
                    self.failures.append(f"crash at op {k}: child ended {how} {code}")
                self.check(f"crash at op {k}/{total}", old, new)
                trials += 1
        return trials

    def random_kills(self, trials: int) -> int:
        start = time.monotonic()
        self.count_ops()
        span = max(0.01, 2.5 * (time.monotonic() - start))
        flag = new_phase_flag()
        for trial in range(trials):
            old = self.current
            flag[:] = bytes([IDLE, 0])

            def body(old=old) -> None:
                version = old
                while True:
                    version += 1
                    flag[1] = 0
                    flag[0] = IN_SAVE
                    with use_ops(PhaseOps(flag=flag)):
                        save_version(self.kind, self.target, version)
                    flag[0] = IDLE

            how, code = _wait(_fork(body), kill_after=self.rng.uniform(0, span))
            self.note(how)
            if how != "killed":
                self.failures.append(f"random kill {trial}: child ended {how} {code}")
            elif landed_mid_save(flag):
                self.note("killed mid-save")  # between the save's first I/O and its return
            if temps_in(os.path.dirname(self.target)):
                self.note("temporaries left")
            try:
                seen = committed(self.kind, self.target)
                if not seen or max(seen) < old:
                    raise AssertionError(f"versions {seen} after a kill; {old} was committed")
                _sweep_and_check(self.kind, self.target)
                self.current = max(seen)
            except Exception as exc:  # noqa: BLE001
                self.failures.append(f"random kill {trial}: {exc}")
                self._reset()
        return trials

    def fsize(self, trials: int) -> int:
        size = os.path.getsize(self.target) if not is_step(self.kind) else 20_000
        for trial in range(trials):
            limit = 1 + (trial * (size + 4096)) // max(1, trials - 1)
            old, new = self.current, self.current + 1
            injector = FaultOps(no_prealloc=bool(trial % 2))

            def body(limit=limit, injector=injector, new=new) -> None:
                signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
                resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
                with use_ops(injector):
                    save_version(self.kind, self.target, new)

            how, code = _wait(_fork(body))
            self.note(f"{how}:{code}")
            if (how, code) not in (("exit", OK), ("exit", STORAGE_ERROR)):
                self.failures.append(f"RLIMIT_FSIZE={limit}: child ended {how} {code}")
            self.check(f"RLIMIT_FSIZE={limit}", old, new, clean_already=True)
        return trials


def main(argv: list[str]) -> None:
    kind, workdir, seed, *specs = argv
    torch.set_num_threads(1)
    summaries = []
    for index, spec in enumerate(specs):
        mode, trials = spec.split(":")
        sub = os.path.join(workdir, mode)
        os.makedirs(sub)
        campaign = Campaign(kind, sub, int(seed) + index)
        run = {"at_op": campaign.at_op, "random": campaign.random_kills, "fsize": campaign.fsize}
        done = run[mode](int(trials))
        summaries.append(
            {
                "mode": mode,
                "kind": kind,
                "trials": done,
                "failures": campaign.failures,
                "outcomes": campaign.outcomes,
            }
        )
    print(json.dumps(summaries))


if __name__ == "__main__":
    main(sys.argv[1:])
