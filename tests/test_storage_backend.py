"""The storage backend interface (storage/backend.py) and the run-directory layout over it."""

from __future__ import annotations

import os

import pytest

from torchkeep.errors import StorageError, UnsafePathError
from torchkeep.storage.backend import BytesPayload, LocalBackend, RenameCommit
from torchkeep.storage.io import write_all
from torchkeep.storage.run_dir import list_leftovers, list_steps, step_exists, write_step


def _fill(data: bytes):
    def fill(fd, file_ops):
        write_all(file_ops, fd, memoryview(data), 0)

    return fill


def test_write_list_read_delete(tmp_path):
    backend = LocalBackend()
    unit = str(tmp_path / "unit")
    staged = backend.stage(unit)
    backend.write_file(os.path.join(staged, "a.bin"), 10, _fill(b"0123456789"))
    assert not os.path.exists(unit)  # nothing visible before the commit
    backend.commit(staged, unit)
    assert [(e.name, e.kind) for e in backend.list(str(tmp_path))] == [("unit", "dir")]
    assert [(e.name, e.kind, e.size) for e in backend.list(unit)] == [("a.bin", "file", 10)]
    head, tail = bytearray(3), bytearray(4)
    backend.read_into(os.path.join(unit, "a.bin"), [(0, memoryview(head)), (6, memoryview(tail))])
    assert bytes(head) == b"012" and bytes(tail) == b"6789"
    with pytest.raises(StorageError, match="truncated"):
        backend.read_into(os.path.join(unit, "a.bin"), [(8, memoryview(bytearray(4)))])
    backend.delete(unit)
    assert backend.list(str(tmp_path)) == []


def test_read_into_refuses_symlink(tmp_path):
    (tmp_path / "real").write_bytes(b"xyz")
    os.symlink(tmp_path / "real", tmp_path / "link")
    assert [e.kind for e in LocalBackend().list(str(tmp_path))] == ["other", "file"]
    with pytest.raises(UnsafePathError, match="symbolic link"):
        LocalBackend().read_into(str(tmp_path / "link"), [(0, memoryview(bytearray(3)))])


class _CountingCommit(RenameCommit):
    def __init__(self) -> None:
        self.commits: list[str] = []
        self.abandoned: list[str] = []

    def commit(self, staged: str, target: str) -> None:
        self.commits.append(os.path.basename(target))
        super().commit(staged, target)

    def abandon(self, staged: str) -> None:
        self.abandoned.append(staged)
        super().abandon(staged)


def test_write_step_uses_the_commit_strategy(tmp_path):
    strategy = _CountingCommit()
    backend = LocalBackend(commit=strategy)
    run = str(tmp_path)
    write_step(run, 7, BytesPayload(b"abcd"), {"loss": 1.5}, 123.0, backend=backend)
    assert strategy.commits == ["step-0000000007"]
    [info] = list_steps(run, backend)
    assert (info.step, info.time, info.metrics) == (7, 123.0, {"loss": 1.5})
    assert info.size == 4 + os.path.getsize(os.path.join(info.path, "meta.json"))
    assert step_exists(run, 7, backend) and not step_exists(run, 8, backend)

    class Broken(BytesPayload):
        def fill(self, fd, file_ops):
            raise OSError(5, "injected")

    with pytest.raises(StorageError):
        write_step(run, 8, Broken(b"abcd"), {}, 124.0, backend=backend)
    assert len(strategy.abandoned) == 1 and not os.path.exists(strategy.abandoned[0])
    assert [s.step for s in list_steps(run, backend)] == [7]
    assert list_leftovers(run, backend) == []
