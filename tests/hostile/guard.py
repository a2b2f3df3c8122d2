"""Run ``guarded_load.py`` on a set of cases and return its outcomes (shared by the suites)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))

#: (suite, payload cases, guarded calls) of every guarded run in this session; the hostile
#: conftest prints the total (the count docs/guarantees.md reports).
TALLY: list[tuple[str, int, int]] = []


def record(suite: str, results: list) -> None:
    """Count a guarded run's payload cases and calls (trusted positive controls excluded)."""
    calls = [r for r in results if "trusted" not in r["entry"]]
    TALLY.append((suite, len({r["case"] for r in calls}), len(calls)))


def run_guarded(cases: dict, tmp_path, sentinel: str | None = None, timeout: int = 1200) -> list:
    """One guarded subprocess over ``cases``; returns the list of per-call outcomes."""
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    manifest = tmp_path / "manifest.json"
    sentinel = sentinel or str(tmp_path / "SENTINEL")
    manifest.write_text(json.dumps({"cases": cases, "sentinel": sentinel, "scratch": str(scratch)}))
    proc = subprocess.run(
        [sys.executable, os.path.join(HERE, "guarded_load.py"), str(manifest)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=str(tmp_path),
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    record(os.path.basename(str(tmp_path)), results)
    return results
