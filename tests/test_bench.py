"""The benchmark's side-by-side warm loads: every family's load ops are timed in one process,
and the report takes a warm cell's seconds from those rows and its peak RSS from the family's
own process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
sys.path.insert(0, BENCH)

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


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__]))
