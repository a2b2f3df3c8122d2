"""`examples/demo.py` end to end: interrupted + resumed run matches an uninterrupted one."""

from __future__ import annotations

import os
import subprocess
import sys

DEMO = os.path.join(os.path.dirname(__file__), "..", "examples", "demo.py")


def test_demo_resumes_to_identical_result(tmp_path) -> None:
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, DEMO, "--run-dir", str(run_dir)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "simulated crash" in out and "resumed from step" in out
    assert "weights bit-identical to the uninterrupted run: yes" in out
    assert "kept because" in out and "best" in out
    steps = sorted(p for p in os.listdir(run_dir) if p.startswith("step-"))
    assert len(steps) == 4  # keep_last=3 plus the best
