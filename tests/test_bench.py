"""The benchmark's measuring rules: side-by-side warm loads (every family's load ops timed in
one process; a warm cell's seconds from those rows, its peak RSS from the family's own
process) and async saves timed over several steady-state saves per process."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
sys.path.insert(0, BENCH)

import contenders  # noqa: E402
from report import aggregate  # noqa: E402


def _row(op: str, seconds: float, peak: int | None, side: bool = False) -> dict:
    row = {"workload": "llm", "size": 0, "kind": "load", "op": op, "cache": "warm"}
    row.update(bytes=1000, seconds=seconds, peak_extra=peak)
    if side:
        row["side_by_side"] = True
    return row


def test_warm_cell_takes_seconds_from_side_by_side_rows_and_rss_from_own_process() -> None:
    rows = [_row("x", 9.0, 500), _row("x", 8.0, 700)]  # own process: slow episode, RSS
    rows += [_row("x", s, None, side=True) for s in (1.0, 2.0, 3.0)]
    stats = aggregate(rows)[("llm", 0, "load", "x", "warm")]
    assert stats.median == 2.0 and stats.best == 1.0 and stats.n == 3
    assert stats.peak == 600


def test_cell_without_side_by_side_rows_uses_all_rows() -> None:
    stats = aggregate([_row("x", 1.0, 10), _row("x", 3.0, 30)])[("llm", 0, "load", "x", "warm")]
    assert stats.median == 2.0 and stats.peak == 20


def test_side_by_side_worker_times_every_family_load_in_rotated_rounds(tmp_path) -> None:
    families = ["torchkeep", "torch", "safetensors"]
    job = {"workload": "huge", "size": 1 << 20, "family": "side-by-side", "dir": str(tmp_path)}
    job.update(load_families=families, rounds=2, rep=1)
    cmd = [sys.executable, os.path.join(BENCH, "worker.py"), json.dumps(job)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    ops = [r["op"] for r in rows]
    expected = {
        "torchkeep verify=False",
        "torchkeep verify=True",
        "torch.load",
        "torch.load mmap=True",
        "safetensors.load_file",
    }
    assert set(ops) == expected and len(ops) == 2 * len(expected)
    assert ops[: len(expected)] != ops[len(expected) :]  # the order turns between rounds
    for r in rows:
        assert r["side_by_side"] and r["peak_extra"] is None
        assert r["cache"] == "warm" and r["kind"] == "load" and r["seconds"] > 0
    assert os.listdir(tmp_path) == []  # its files are removed


def _async_row(blocked: float, samples: list[float] | None) -> dict:
    row = {"workload": "llm", "size": 0, "kind": "save", "op": "a", "cache": ""}
    row.update(bytes=1000, seconds=1.0, peak_extra=None, blocked=blocked)
    if samples is not None:
        row["blocked_samples"] = samples
    return row


def test_blocked_cell_is_the_median_of_every_save_of_every_process() -> None:
    rows = [_async_row(0.2, [0.1, 0.2, 0.9]), _async_row(0.5, [0.4, 0.5, 0.6])]
    rows.append(_async_row(0.7, None))  # a row from before the samples were kept
    stats = aggregate(rows)[("llm", 0, "save", "a", "")]
    assert stats.blocked == 0.5  # median of 0.1 0.2 0.4 0.5 0.6 0.7 0.9; of the rows: 0.5 too
    rows[1]["blocked_samples"] = [0.05, 0.06, 0.07]
    assert aggregate(rows)[("llm", 0, "save", "a", "")].blocked == 0.1


def test_async_saves_are_timed_after_a_warm_up_each_to_a_new_path(tmp_path) -> None:
    path = str(tmp_path / "ck")
    started: list[tuple[str, bool]] = []

    def start(p: str):
        started.append((p, os.path.exists(p)))
        open(p, "w").close()
        return lambda: time.sleep(0.01)  # the background write: not blocked time

    result = contenders.time_async_saves(start, path)
    n = contenders.ASYNC_SAMPLES
    assert started == [(path + ".warmup", False)] + [(path, False)] * n
    assert not os.path.exists(path + ".warmup")
    assert len(result["blocked_samples"]) == n
    assert result["blocked"] == statistics.median(result["blocked_samples"])
    assert result["seconds"] >= 0.01 > max(result["blocked_samples"])


def test_worker_reports_every_timed_async_save_and_the_copy_floor(tmp_path) -> None:
    job = {"workload": "huge", "size": 1 << 20, "family": "torchkeep", "dir": str(tmp_path)}
    job.update(ops=["torchkeep.save_async"], caches=[], rep=0)
    cmd = [sys.executable, os.path.join(BENCH, "worker.py"), json.dumps(job)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {r["op"]: r for r in map(json.loads, proc.stdout.splitlines())}
    saved = rows["torchkeep.save_async"]
    assert len(saved["blocked_samples"]) == contenders.ASYNC_SAMPLES
    assert 0 < saved["blocked"] <= saved["seconds"]
    assert rows["bare memory copy (Tensor.copy_)"]["kind"] == "floor"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__]))
