"""Issue 5 item 3: simulated power loss at every point of a save, keeping only synced state.

A save of version ``new`` over ``old`` is recorded operation by operation, then replayed by
:mod:`powerloss` into every crash state (after each operation; directory entries synced or
current; file bytes synced, all written, or the last write torn). Every state must load as the
old or the new version, and once the save has returned, the synced state must hold the new one.
A missing file fsync, a missing directory fsync, or a rename before the data is durable fails.
Manager steps run with retention (``step``, keep_last=2) and without (``bare_step``): retention's
own fsync of the run directory would hide a missing fsync after the step's commit rename.
"""

from __future__ import annotations

import os
import shutil

import pytest
from faultlib import FaultOps
from powerloss import SimFS, crash_states
from scenarios import KINDS, check_after_fault, committed, is_step, save_version

from _direct import direct_io_supported
from torchkeep.storage.io import use_ops
from torchkeep.storage.local import is_temp


def _name(kind: str) -> str:
    return "run" if is_step(kind) else "ckpt.tk"


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


class SkipCommitFsync(FaultOps):
    """A recorder whose fsync of a committed directory right after a commit rename into it (not
    a rename to a trash name, not inside a step being assembled) does nothing: the bug of a
    step commit that forgets to make its rename durable; later fsyncs still happen."""

    def fsync_dir(self, path: str) -> None:
        last = self.log[-1] if self.log else ()
        path = os.path.abspath(path)
        committing = last[:1] == ("replace",) and os.path.dirname(last[2]) == path
        names = (os.path.basename(last[2]), os.path.basename(path)) if committing else ()
        if committing and not any(is_temp(name) for name in names):
            self.skipped = getattr(self, "skipped", 0) + 1
            return
        super().fsync_dir(path)


@pytest.mark.parametrize("kind", ["step", "bare_step"])
def test_retention_hides_a_missing_commit_fsync(kind: str, tmp_path) -> None:
    """Why ``bare_step`` exists: drop the run directory's fsync after a step's rename. With
    retention (``step``) the fsync after renaming the oldest step to trash makes the new step
    durable anyway, so only the scenario without retention can see the commit fsync missing."""
    live = tmp_path / "live"
    live.mkdir()
    run = str(live / "run")
    for version in (1, 2):
        save_version(kind, run, version)
    sim = SimFS(str(live))
    recorder = SkipCommitFsync(keep_data=True)
    with use_ops(recorder):
        save_version(kind, run, 3)
    assert recorder.skipped >= 1
    for record in recorder.log:
        sim.apply(record)
    state = tmp_path / "state"
    state.mkdir()
    sim.materialize(str(state), "synced", "synced")
    seen = committed(kind, str(state / "run"))
    if kind == "step":
        assert 3 in seen, seen  # retention's directory fsync covered the gap
    else:
        assert 3 not in seen and 2 in seen, seen  # the missing fsync is visible
