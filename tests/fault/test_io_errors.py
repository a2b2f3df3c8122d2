"""Issue 5 items 4-5 at the I/O interface: an error injected at every operation of a save.

Each case asserts: the error reached the caller as a StorageError carrying the injected errno
(every one, also a failed directory fsync after the rename, when the files already look fine,
and a failure in retention after the commit), the previous checkpoint still loads and verifies
(or the new one, when the fault hit after the commit), nothing partial is visible, and no
temporary is left behind (except when the fault hit the cleanup itself). Manager steps run with
retention (``step``) and without (``bare_step``).
"""

from __future__ import annotations

import errno
import os

import pytest
from faultlib import FaultOps, temps_in
from scenarios import KINDS, STEP_KINDS, check_after_fault, committed, is_step, save_version

import torchkeep
from torchkeep.storage.io import use_ops

CLEANUP = {"unlink", "rmtree"}


def _prepare(kind: str, tmp_path) -> tuple[str, int]:
    target = str(tmp_path / ("run" if is_step(kind) else "ckpt.tk"))
    save_version(kind, target, 1)
    save_version(kind, target, 2)
    return target, 2


def _count_ops(kind: str, target: str, version: int) -> FaultOps:
    recorder = FaultOps()
    with use_ops(recorder):
        save_version(kind, target, version)
    return recorder


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EIO])
def test_error_at_every_operation(kind: str, err: int, write_mode: str, tmp_path) -> None:
    target, old = _prepare(kind, tmp_path)
    probe_dir = tmp_path / "probe"
    probe_dir.mkdir()
    probe = str(probe_dir / ("run" if is_step(kind) else "ckpt.tk"))
    save_version(kind, probe, 1)
    save_version(kind, probe, 2)
    total = _count_ops(kind, probe, 3).counted
    assert total >= 8, "a save performs at least open, writes, fsync, close, rename, dir fsync"
    new = old + 1
    for k in range(total):
        injector = FaultOps(at=k, action="raise", err=err)
        raised = None
        with use_ops(injector):
            try:
                save_version(kind, target, new)
            except Exception as exc:  # noqa: BLE001 - the type is what we check
                raised = exc
        where = f"{kind}: {errno.errorcode[err]} at op {k} ({injector.fired_kind})"
        assert injector.fired, where
        # Every injected error must reach the caller, also one after the commit (a failed
        # directory fsync after the rename) or in retention: files that look fine on disk do
        # not make a swallowed error acceptable.
        assert isinstance(raised, torchkeep.StorageError), f"{where}: raised {raised!r}"
        assert raised.errno == err or errno.errorcode[err] in repr(raised), f"{where}: {raised!r}"
        seen = check_after_fault(kind, target, old, new)
        # A failed directory fsync while retention deletes an old step (after the new step
        # committed) leaves that step's trash for the next open's sweep, on purpose.
        trash_left = kind in STEP_KINDS and new in seen and injector.fired_kind == "fsync_dir"
        if injector.fired_kind not in CLEANUP and not trash_left:
            assert temps_in(os.path.dirname(target) if not is_step(kind) else target) == [], where
        if new in seen:  # committed anyway: reset so the next case saves over `old` again
            target, old = _reset(kind, tmp_path, k)


def _reset(kind: str, tmp_path, k: int) -> tuple[str, int]:
    sub = tmp_path / f"case{k}"
    sub.mkdir()
    return _prepare(kind, sub)


def test_fsync_eio_fails_without_rename_or_retry(tmp_path) -> None:
    target, old = _prepare("file", tmp_path)
    injector = FaultOps(at=0, action="raise", err=errno.EIO, kinds=("fsync",))
    with use_ops(injector), pytest.raises(torchkeep.StorageError, match="I/O error") as info:
        save_version("file", target, old + 1)
    assert info.value.errno == errno.EIO
    kinds = injector.kinds_seen()
    after = kinds[kinds.index("fsync") + 1 :]
    assert "fsync" not in after and "replace" not in after, kinds
    assert committed("file", target) == [old]
    assert temps_in(str(tmp_path)) == []


@pytest.mark.parametrize(
    "err,hint",
    [(errno.EXDEV, "different filesystems"), (errno.EACCES, "permission denied")],
)
def test_rename_errors_are_clear(err: int, hint: str, tmp_path) -> None:
    target, old = _prepare("file", tmp_path)
    injector = FaultOps(at=0, action="raise", err=err, kinds=("replace",))
    with use_ops(injector), pytest.raises(torchkeep.StorageError, match=hint) as info:
        save_version("file", target, old + 1)
    assert target in str(info.value) and info.value.errno == err
    assert committed("file", target) == [old]
    assert temps_in(str(tmp_path)) == []


@pytest.mark.parametrize("kind", KINDS)
def test_short_writes_and_eintr_are_resumed(kind: str, tmp_path) -> None:
    target, old = _prepare(kind, tmp_path)
    injector = FaultOps(max_write=1000, eintr=True)
    with use_ops(injector):
        save_version(kind, target, old + 1)
    assert injector.kinds_seen().count("pwrite") > 10  # the data really went in small pieces
    assert old + 1 in committed(kind, target)


def test_write_making_no_progress_is_an_error(tmp_path) -> None:
    target, old = _prepare("file", tmp_path)
    with use_ops(FaultOps(max_write=0)), pytest.raises(torchkeep.StorageError):
        save_version("file", target, old + 1)
    assert committed("file", target) == [old]
    assert temps_in(str(tmp_path)) == []


def test_enospc_message_says_disk_full(tmp_path) -> None:
    target, old = _prepare("file", tmp_path)
    injector = FaultOps(at=1, action="raise", err=errno.ENOSPC, kinds=("pwrite",))
    with use_ops(injector), pytest.raises(torchkeep.StorageError, match="disk is full"):
        save_version("file", target, old + 1)
    assert committed("file", target) == [old]


@pytest.mark.parametrize("kind", ["file", "bare_step", "async"])
def test_failed_directory_fsync_after_the_rename_is_raised(kind: str, tmp_path) -> None:
    """The rename already happened, so the files look fine; the save must still fail with a
    StorageError saying the new content may not be durable (not return as if it were)."""
    target, old = _prepare(kind, tmp_path)
    probe_dir = tmp_path / "probe"
    probe_dir.mkdir()
    probe, _ = _prepare(kind, probe_dir)
    kinds = [rec[0] for rec in _count_ops(kind, probe, old + 1).log]  # where is the last one?
    last_dir_sync = sum(1 for k in kinds if k == "fsync_dir") - 1
    assert kinds.index("replace") < len(kinds) - 1 - kinds[::-1].index("fsync_dir")
    injector = FaultOps(at=last_dir_sync, action="raise", err=errno.EIO, kinds=("fsync_dir",))
    with use_ops(injector), pytest.raises(torchkeep.StorageError, match="may not be durable"):
        save_version(kind, target, old + 1)
    assert injector.fired and injector.kinds_seen()[-1] == "fsync_dir"
    assert old + 1 in committed(kind, target)  # in place, as the message says
