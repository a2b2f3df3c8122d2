"""Processes for the SIGTERM and concurrency suites (issue 5 items 6-7).

``python runners.py train RUN_DIR MODE`` trains forever, saving a step per iteration with the
manager; MODE ``graceful`` stops at SIGTERM after the current step and closes the manager
(waiting for the in-flight async save), ``default`` keeps Python's default (die at once).
Prints ``ready`` once the first save returned, ``saved N`` after each returned save, and
(graceful) whether a background write was in flight when SIGTERM arrived.

``python runners.py write RUN_DIR STEPS GOFILE`` saves STEPS steps (keep_last=2) and counts the
LockErrors it meets; ``python runners.py read RUN_DIR STOPFILE`` opens the newest step, waits
(bounded) until retention deletes it, then reads and checks every byte; it prints a JSON
summary in which ``read_after_delete`` counts the reads of a step deleted while open.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

import torch
from scenarios import make_state, same

import torchkeep
from torchkeep.manager import CheckpointManager
from torchkeep.storage.run_dir import STATE_FILE, list_steps
from torchkeep.transfer.reader import FileReader


def train(run_dir: str, mode: str) -> None:
    stop: list[bool] = []
    last = []  # the handle of the latest returned save

    def on_sigterm(*_: object) -> None:
        stop.append(bool(last) and not last[-1].done())  # True: a write was in flight

    if mode == "graceful":
        signal.signal(signal.SIGTERM, on_sigterm)
    manager = CheckpointManager(run_dir, rng=False, keep_last=3, async_save=True)
    first = step = max([s.step for s in list_steps(run_dir)], default=0) + 1
    while not stop:
        last[:] = [manager.save(step, {"weights": make_state(step, scale=20)})]
        if step == first:
            print("ready", flush=True)  # after one save, so a SIGTERM never finds none
        print(f"saved {step}", flush=True)
        step += 1
    manager.close()
    print(f"in flight at SIGTERM: {stop[0]}", flush=True)
    print("closed", flush=True)


def write(run_dir: str, steps: int, gofile: str) -> None:
    manager = CheckpointManager(run_dir, rng=False, keep_last=2)
    print("ready", flush=True)
    while not os.path.exists(gofile):  # both writers start together, so they contend
        time.sleep(0.01)
    saved = refused = 0
    step = 1
    while saved < steps:
        try:
            manager.save(step, {"weights": make_state(step)})
            saved += 1
        except torchkeep.LockError:
            refused += 1
            time.sleep(0.05)
        except torchkeep.TorchkeepError as exc:
            if "already exists" not in str(exc):
                raise
        step += 1
    manager.close()
    print(json.dumps({"saved": saved, "refused": refused}))


def read(run_dir: str, stopfile: str) -> None:
    summary = {"reads": 0, "vanished": 0, "read_after_delete": 0, "failures": []}
    print("ready", flush=True)  # imports done: the writers may start
    while not os.path.exists(stopfile) or summary["reads"] == 0:
        steps = list_steps(run_dir)
        if not steps:
            time.sleep(0.01)
            continue
        info = steps[-1]
        try:
            reader = FileReader(os.path.join(info.path, STATE_FILE))
        except (FileNotFoundError, torchkeep.CheckpointNotFoundError):
            summary["vanished"] += 1  # deleted between listing and opening: never partial
            continue
        with reader:
            # Hold the step open until retention deletes it (or the writers stop), so the
            # read-after-delete case really happens instead of depending on timing.
            deadline = time.monotonic() + 2.0
            while os.path.exists(info.path) and time.monotonic() < deadline:
                if os.path.exists(stopfile):
                    break
                time.sleep(0.005)
            try:
                tree = reader.load()
                if not same(tree["values"]["weights"], make_state(info.step)):
                    raise AssertionError("content differs from the saved version")
                summary["reads"] += 1
                if not os.path.exists(info.path):
                    summary["read_after_delete"] += 1
            except Exception as exc:  # noqa: BLE001 - reported
                summary["failures"].append(f"step {info.step}: {exc!r}")
    print(json.dumps(summary))


if __name__ == "__main__":
    torch.set_num_threads(1)
    command, *args = sys.argv[1:]
    if command == "train":
        train(args[0], args[1])
    elif command == "write":
        write(args[0], int(args[1]), args[2])
    else:
        read(args[0], args[1])
