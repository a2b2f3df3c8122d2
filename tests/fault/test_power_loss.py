"""Issue 5 item 3: simulated power loss at every point of a save, keeping only synced state.

A save of version ``new`` over ``old`` is recorded operation by operation, then replayed by
:mod:`powerloss` into every crash state (after each operation; directory entries synced or
current; file bytes synced, all written, or the last write torn). Every state must load as the
old or the new version, and once the save has returned, the synced state must hold the new one.
A missing file fsync, a missing directory fsync, or a rename before the data is durable fails.
"""

from __future__ import annotations

import os
import shutil

import pytest
from faultlib import FaultOps
from powerloss import SimFS, crash_states
from scenarios import KINDS, STEP_KINDS, check_after_fault, committed, save_version

from _direct import direct_io_supported
from torchkeep.storage.io import use_ops


def _name(kind: str) -> str:
    return "run" if kind in STEP_KINDS else "ckpt.tk"


@pytest.mark.parametrize("kind", KINDS)
def test_every_power_loss_state_is_old_or_new(kind: str, write_mode: str, tmp_path) -> None:
    live = tmp_path / "live"
    live.mkdir()
    target = str(live / _name(kind))
    save_version(kind, target, 1)
    save_version(kind, target, 2)
    sim = SimFS(str(live))
    recorder = FaultOps(keep_data=True)
    with use_ops(recorder):
        save_version(kind, target, 3)
    log = recorder.log
    assert [r[0] for r in log].count("fsync_dir") >= 1
    if write_mode == "direct" and direct_io_supported(str(live)):
        assert "truncate" in [r[0] for r in log]  # the direct path really ran
    checked = 0
    for p, dir_mode, data_mode in crash_states(sim, log):
        state = tmp_path / "state"
        shutil.rmtree(state, ignore_errors=True)
        state.mkdir()
        sim.materialize(str(state), dir_mode, data_mode)
        where = f"{kind}: power loss after op {p}/{len(log)} ({dir_mode} dirs, {data_mode} data)"
        try:
            seen = check_after_fault(kind, str(state / _name(kind)), 2, 3)
        except Exception as exc:  # noqa: BLE001 - report the state that failed
            raise AssertionError(f"{where}: {exc}") from exc
        if p == len(log) and (dir_mode, data_mode) == ("synced", "synced"):
            assert 3 in seen, f"{where}: the save returned but the new version is not durable"
        checked += 1
    assert checked > 6 * (len(log) + 1)  # plus the journal-prefix states
    print(f"{kind} ({write_mode}): {checked} power-loss states")


def _record_save_without(tmp_path, monkeypatch, op: str) -> tuple[str, SimFS, FaultOps]:
    """Save version 1, then record saving version 2 with FileOps.<op> made a no-op (the bug)."""
    live = tmp_path / "live"
    live.mkdir()
    target = str(live / "ckpt.tk")
    save_version("file", target, 1)
    sim = SimFS(str(live))
    recorder = FaultOps(keep_data=True)
    monkeypatch.setattr(FaultOps, op, lambda self, arg: None)
    with use_ops(recorder):
        save_version("file", target, 2)
    return target, sim, recorder


def test_model_catches_a_missing_fsync(tmp_path, monkeypatch) -> None:
    """The simulation must fail a save that renames before fsyncing (proves it has teeth)."""
    target, sim, recorder = _record_save_without(tmp_path, monkeypatch, "fsync")
    failures = 0
    for p, dir_mode, data_mode in crash_states(sim, recorder.log):
        state = tmp_path / f"s{p}{dir_mode}{data_mode}"
        state.mkdir()
        sim.materialize(str(state), dir_mode, data_mode)
        try:
            committed("file", str(state / "ckpt.tk"))
        except Exception:  # noqa: BLE001 - any failure to load counts
            failures += 1
    assert failures > 0
    assert os.path.exists(target)


def test_model_catches_a_missing_directory_fsync(tmp_path, monkeypatch) -> None:
    """Without the directory fsync the completed save is not durable: the model must see it."""
    target, sim, recorder = _record_save_without(tmp_path, monkeypatch, "fsync_dir")
    for record in recorder.log:
        sim.apply(record)
    state = tmp_path / "state"
    state.mkdir()
    sim.materialize(str(state), "synced", "synced")
    assert committed("file", str(state / "ckpt.tk")) == [1]
