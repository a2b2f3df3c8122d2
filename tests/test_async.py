"""save_async and CheckpointManager(async_save=True): snapshot, order, errors, exit, crashes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading

import pytest
import torch

import torchkeep
from torchkeep.errors import StorageError
from torchkeep.storage.io import FileOps, use_ops
from torchkeep.storage.run_dir import list_leftovers, list_steps
from torchkeep.transfer import asyncsave
from torchkeep.transfer.asyncsave import Stager
from torchkeep.transfer.writer import prepare


@pytest.mark.parametrize("numel", [1000, 1 << 19], ids=["caller-copy", "shared-copy"])
def test_caller_may_mutate_tensors_once_save_async_returns(tmp_path, numel) -> None:
    weight = torch.arange(numel, dtype=torch.float32)
    bias = torch.ones(7, dtype=torch.bfloat16)
    handle = torchkeep.save_async({"w": weight, "b": bias, "n": 3}, tmp_path / "a.tk")
    weight.add_(1)  # training continues: the snapshot must not see this
    bias.mul_(2)
    assert handle.wait() == str(tmp_path / "a.tk") and handle.done()
    loaded = torchkeep.load(tmp_path / "a.tk")
    assert torch.equal(loaded["w"], torch.arange(numel, dtype=torch.float32)) and loaded["n"] == 3
    assert torch.equal(loaded["b"], torch.ones(7, dtype=torch.bfloat16))


class Gate(FileOps):
    """Blocks the background thread's first write until ``release`` is set."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()

    def pwrite(self, fd: int, data: memoryview, offset: int) -> int:
        if threading.current_thread().name == "torchkeep-save" and not self.release.is_set():
            self.entered.set()
            assert self.release.wait(30)
        return super().pwrite(fd, data, offset)


def test_one_in_flight_and_last_save_wins(tmp_path) -> None:
    """The first save is held mid-write (a gate on its first write), so the second call
    really meets a save in flight: it must wait for it, not run beside it."""
    path = tmp_path / "b.tk"
    gate = Gate()
    second: list = []
    with use_ops(gate):
        first = torchkeep.save_async({"v": torch.zeros(4)}, path)
        assert gate.entered.wait(30) and not first.done()  # the first write is in flight
        caller = threading.Thread(
            target=lambda: second.append(torchkeep.save_async({"v": torch.ones(4)}, path))
        )
        caller.start()
        caller.join(0.3)
        assert caller.is_alive() and not second, "the second save did not wait for the first"
        gate.release.set()
        caller.join(30)
    assert first.done() and second  # the second call returned only after the first finished
    second[0].result()
    assert torch.equal(torchkeep.load(path)["v"], torch.ones(4))


def test_background_error_reraised_by_handle(tmp_path) -> None:
    handle = torchkeep.save_async({"v": torch.ones(2)}, tmp_path / "missing" / "c.tk")
    with pytest.raises(StorageError, match="creating a temporary file"):
        handle.wait()
    assert isinstance(handle.exception(), StorageError) and "failed" in repr(handle)
    with pytest.raises(StorageError):
        handle.result()  # every wait re-raises


def test_invalid_object_raises_in_caller(tmp_path) -> None:
    with pytest.raises(torchkeep.UnsupportedValueError):
        torchkeep.save_async({"v": object()}, tmp_path / "d.tk")
    assert not os.listdir(tmp_path)


def test_staging_buffer_reused_bounded_and_pin_fallback() -> None:
    stager = Stager(pin=True)  # no CUDA here: pinned allocation falls back to pageable memory
    small = prepare({"a": torch.ones(10), "b": torch.arange(6).view(2, 3)})
    stager.stage(small)
    first = stager.buffer
    assert first is not None and not stager.pinned
    stager.stage(prepare({"a": torch.zeros(10)}))
    assert stager.buffer is first  # reused
    stager.stage(prepare({"a": torch.zeros(1000)}))
    assert stager.buffer.numel() >= 4000 and stager.buffer is not first  # grown, old dropped
    stager.release()
    assert stager.buffer is None


def test_sync_save_makes_no_snapshot(tmp_path) -> None:
    asyncsave._DEFAULT.stager.release()
    torchkeep.save({"w": torch.ones(100)}, tmp_path / "s.tk")
    assert asyncsave._DEFAULT.stager.buffer is None


def test_retention_never_deletes_while_save_in_flight(tmp_path) -> None:
    gate = Gate()
    with torchkeep.CheckpointManager(tmp_path, keep_last=1, async_save=True) as mgr:
        mgr.save(1, {"w": torch.ones(3)}).wait()
        with use_ops(gate):
            handle = mgr.save(2, {"w": torch.zeros(3)})
            assert gate.entered.wait(30)
            assert [s.step for s in list_steps(tmp_path)] == [1]  # still there, still listed
            assert len(list_leftovers(tmp_path)) == 1  # step 2 is being written
            gate.release.set()
            handle.wait()
        assert [s.step for s in mgr.steps()] == [2]
        state = {"w": torch.empty(3)}
        assert mgr.restore(state) == 2 and torch.equal(state["w"], torch.zeros(3))


class FailCommit(FileOps):
    def replace(self, src: str, dst: str) -> None:
        if os.path.basename(dst).startswith("step-"):
            raise OSError(28, "No space left on device")
        super().replace(src, dst)


def test_manager_surfaces_background_error_on_next_call(tmp_path) -> None:
    mgr = torchkeep.CheckpointManager(tmp_path, async_save=True)
    with use_ops(FailCommit()):
        mgr.save(1, {"w": torch.ones(1)}).exception()
    with pytest.raises(StorageError, match="disk is full"):
        mgr.save(2, {"w": torch.ones(1)})
    mgr.save(2, {"w": torch.ones(1)})  # reported once; the manager keeps working
    mgr.close()
    assert [s.step for s in list_steps(tmp_path)] == [2]


SCRIPT = textwrap.dedent(
    """
    import os, signal, sys, time, torch, torchkeep
    from torchkeep.storage import io

    class Slow(io.FileOps):
        def pwrite(self, fd, data, offset):
            time.sleep(0.05)
            if sys.argv[2] == "kill" and data.nbytes > 1000:
                os.kill(os.getpid(), signal.SIGKILL)
            return super().pwrite(fd, data, offset)

    mgr = torchkeep.CheckpointManager(sys.argv[1], async_save=True)
    mgr.save(1, {"w": torch.zeros(4096)}).wait()
    io._current = Slow()
    mgr.save(2, {"w": torch.ones(4096)})
    print("returned", flush=True)
    """
)


def _script(tmp_path, mode: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path), mode],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_interpreter_exit_waits_for_in_flight_save(tmp_path) -> None:
    proc = _script(tmp_path, "exit")
    assert proc.returncode == 0 and "returned" in proc.stdout, proc.stderr
    assert [s.step for s in list_steps(tmp_path)] == [1, 2]
    state = {"w": torch.empty(4096)}
    assert torchkeep.CheckpointManager(tmp_path).restore(state) == 2
    assert torch.equal(state["w"], torch.ones(4096))


AT_EXIT_SCRIPT = textwrap.dedent(
    """
    import atexit, os, sys
    import torch, torchkeep

    root = sys.argv[1]
    torchkeep.save({"w": torch.zeros(10)}, os.path.join(root, "early.tk"))  # pool in use

    def final_checkpoint():
        big = torch.arange(1 << 16, dtype=torch.float32)  # shared snapshot copy, direct I/O
        torchkeep.save({"weight": big.view(256, 256)}, os.path.join(root, "sync.tk"))
        model = torch.nn.Linear(256, 256, bias=False)
        torchkeep.load_state_dict(model, os.path.join(root, "sync.tk"))
        assert torch.equal(model.weight.detach().reshape(-1), big)
        torchkeep.save_async({"w": big + 1}, os.path.join(root, "async.tk"))  # no wait()
        mgr = torchkeep.CheckpointManager(os.path.join(root, "run"), async_save=True)
        mgr.save(7, {"w": big + 2})
        print("handler done", flush=True)

    atexit.register(final_checkpoint)
    """
)


def test_saves_and_loads_work_in_an_atexit_handler(tmp_path) -> None:
    """A final checkpoint from an ``atexit`` handler: by then the interpreter has stopped
    every ``concurrent.futures`` pool and joined its threads, so torchkeep's I/O must run
    inline (it raised "cannot schedule new futures after shutdown"), and an async save must
    still be complete when the process is gone."""
    env = dict(os.environ, TORCHKEEP_DIRECT_MIN_BYTES="1", TORCHKEEP_SNAPSHOT_PIECE_BYTES="4096")
    proc = subprocess.run(
        [sys.executable, "-c", AT_EXIT_SCRIPT, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 0 and "handler done" in proc.stdout, proc.stderr
    assert proc.stderr == "", proc.stderr
    big = torch.arange(1 << 16, dtype=torch.float32)
    assert torch.equal(torchkeep.load(tmp_path / "async.tk")["w"], big + 1)
    state = {"w": torch.empty(1 << 16)}
    assert torchkeep.CheckpointManager(tmp_path / "run").restore(state) == 7
    assert torch.equal(state["w"], big + 2)


def test_crash_during_background_write_keeps_only_committed(tmp_path) -> None:
    proc = _script(tmp_path, "kill")
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert [s.step for s in list_steps(tmp_path)] == [1]
    mgr = torchkeep.CheckpointManager(tmp_path)  # sweeps the dead writer's temporary
    assert list_leftovers(tmp_path) == []
    state = {"w": torch.empty(4096)}
    assert mgr.restore(state) == 1 and torch.equal(state["w"], torch.zeros(4096))


def test_unobserved_failure_reported_at_exit(tmp_path) -> None:
    code = (
        "import torch, torchkeep, sys; "
        "torchkeep.save_async({'v': torch.ones(2)}, sys.argv[1] + '/no/such/dir/x.tk')"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=60
    )
    assert "background save" in proc.stderr and "failed" in proc.stderr


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tensors_staged_in_pinned_memory(tmp_path) -> None:
    weight = torch.arange(4096, dtype=torch.float32, device="cuda")
    handle = torchkeep.save_async({"w": weight}, tmp_path / "g.tk")
    weight.zero_()
    handle.wait()
    assert asyncsave._DEFAULT.stager.pinned
    loaded = torchkeep.load(tmp_path / "g.tk", map_location="cpu")
    assert torch.equal(loaded["w"], torch.arange(4096, dtype=torch.float32))
