"""Issue 5 items 6-7: SIGTERM in a manager training loop; concurrent writers and readers.

SIGTERM arrives at a random moment of a loop that saves a step per iteration (async). With a
graceful handler the loop finishes, closes the manager within a grace period and every step
it reported saved is committed; with Python's default action the process dies at once. Either
way every committed step loads completely and nothing partial is listed.

Two writers and two readers share one run directory: the second writer is refused with
LockError while the first holds the lock; readers never see a partial step, and a step that
retention deletes while a reader has it open still reads correctly.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
from faultlib import temps_in
from scenarios import step_versions

from torchkeep.manager import CheckpointManager

HERE = os.path.dirname(os.path.abspath(__file__))
GRACE_SECONDS = 60


def _start(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, os.path.join(HERE, "runners.py"), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=HERE,
    )


@pytest.mark.parametrize("mode", ["graceful", "default"])
def test_sigterm_mid_training_loop(mode: str, tmp_path, long_run: bool) -> None:
    rng = random.Random(mode)
    run = str(tmp_path / "run")
    in_flight = 0
    for trial in range(10 if long_run else 3):
        proc = _start("train", run, mode)
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
        time.sleep(rng.uniform(0.0, 0.5))  # ready came after the first save returned
        proc.send_signal(signal.SIGTERM)
        try:
            out, err = proc.communicate(timeout=GRACE_SECONDS)
        except subprocess.TimeoutExpired:
            proc.kill()
            pytest.fail(f"trial {trial}: no exit within {GRACE_SECONDS}s of SIGTERM")
        saved = [int(line.split()[1]) for line in out.splitlines() if line.startswith("saved")]
        steps = step_versions(run, scale=20)  # every listed step loads completely
        assert saved, out  # the first save returned before the signal
        if mode == "graceful":
            assert proc.returncode == 0 and out.rstrip().endswith("closed"), err[-2000:]
            assert max(saved) in steps, (saved, steps)  # the last reported save committed
            assert temps_in(run) == []
            in_flight += "in flight at SIGTERM: True" in out
        else:
            assert proc.returncode == -signal.SIGTERM, err[-2000:]
        CheckpointManager(run, rng=False).close()  # the next open sweeps leftovers
        assert temps_in(run) == []
    if mode == "graceful":  # the close really had a background write to wait for
        assert in_flight >= 1, "no SIGTERM arrived while an async write was in flight"


def test_writers_and_readers_share_a_run_directory(tmp_path, long_run: bool) -> None:
    run = str(tmp_path / "run")
    stop = str(tmp_path / "stop")
    steps = 40 if long_run else 12
    os.makedirs(run)
    readers = [_start("read", run, stop) for _ in range(2)]
    go = str(tmp_path / "go")
    writers = [_start("write", run, str(steps), go) for _ in range(2)]
    # Readers that were still importing torch when the writers finished would only ever see
    # the last step, which no retention deletes (a CI run failed that way): wait for them too.
    for proc in readers + writers:
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
    open(go, "w").close()
    results = []
    for proc in writers:
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-2000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    open(stop, "w").close()
    summaries = []
    for proc in readers:
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-2000:]
        summaries.append(json.loads(out.strip().splitlines()[-1]))
    assert all(r["saved"] == steps for r in results)
    assert sum(r["refused"] for r in results) > 0, "the writers never contended for the lock"
    for summary in summaries:
        assert summary["failures"] == [] and summary["reads"] > 0, summary
        # Retention deleted a step while this reader had it open, and the read still matched.
        assert summary["read_after_delete"] > 0, summary
    assert len(step_versions(run)) <= 2  # retention ran; survivors are complete
    print(json.dumps({"writers": results, "readers": summaries}))
