"""Direct-I/O saves (transfer/direct_writer.py): same bytes as a buffered save, safe fallbacks.

Every test forces direct I/O on small files (``DIRECT_MIN_BYTES`` = 1) with small staging
segments, so entries straddle segments, the header shares its block with data and the last
segment needs padding and a truncation.
"""

from __future__ import annotations

import errno
import mmap
import os
import tempfile

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import torchkeep
from _direct import direct_io_supported
from torchkeep import knobs
from torchkeep.storage.aligned import STAGING, AlignedBuffer, BufferPool
from torchkeep.storage.io import FileOps, use_ops
from torchkeep.transfer.asyncsave import Stager, write_file
from torchkeep.transfer.direct_writer import wants_direct
from torchkeep.transfer.writer import prepare


class SpyOps(FileOps):
    """Records which direct-I/O switches and truncations a save made."""

    def __init__(self) -> None:
        self.switches: list[bool] = []
        self.truncations: list[int] = []

    def set_direct(self, fd: int, enable: bool) -> bool:
        ok = super().set_direct(fd, enable)
        self.switches.append(enable and ok)
        return ok

    def truncate(self, fd: int, size: int) -> None:
        self.truncations.append(size)
        super().truncate(fd, size)


@pytest.fixture
def direct(monkeypatch, tmp_path) -> None:
    if not direct_io_supported(str(tmp_path)):
        pytest.skip("this filesystem has no direct I/O")
    monkeypatch.setattr(knobs, "DIRECT_MIN_BYTES", 1)
    monkeypatch.setattr(knobs, "DIRECT_CHUNK_BYTES", 8192)
    monkeypatch.setattr(knobs, "CHUNK_BYTES", 5000)  # hash chunks cut across segments too
    monkeypatch.setattr(knobs, "SMALL_TENSOR_BYTES", 16)  # most test tensors count as large


def _objects() -> dict[str, object]:
    gen = torch.Generator().manual_seed(3)
    weight = torch.randn(64, 33, generator=gen)
    return {
        "mixed": {
            "w": weight,
            "tied": weight,
            "view": weight[3:9, 1:5],
            "half": torch.randn(17, 3, generator=gen).half(),
            "bf16": torch.randn(1001, generator=gen).bfloat16(),
            "empty": torch.empty(0, 4),
            "scalar": torch.tensor(2.5),
            "ints": torch.arange(5000, dtype=torch.int64),
            "bool": torch.rand(333, generator=gen) > 0.5,
            "meta": {"epoch": 7, "name": "run", "lr": [0.1, 0.01]},
        },
        "one_big": {"x": torch.randn(100_000, generator=gen)},
        "many_small": {f"t{i}": torch.randn(i % 7 + 1, generator=gen) for i in range(300)},
        "exact_blocks": {"a": torch.zeros(4096, dtype=torch.uint8), "b": torch.ones(2048)},
    }


def _save_bytes(obj, path: str, ops: FileOps | None = None) -> bytes:
    with use_ops(ops or FileOps()):
        torchkeep.save(obj, path)
    with open(path, "rb") as f:
        return f.read()


@pytest.mark.parametrize("name", list(_objects()))
def test_direct_save_writes_the_same_bytes_as_buffered(name, direct, monkeypatch, tmp_path):
    obj = _objects()[name]
    spy = SpyOps()
    direct_bytes = _save_bytes(obj, str(tmp_path / "direct.tk"), spy)
    assert spy.switches == [True, False], "the save must switch to direct I/O and back"
    assert spy.truncations == [len(direct_bytes)]
    monkeypatch.setattr(knobs, "DIRECT_IO", 0)
    buffered_spy = SpyOps()
    buffered_bytes = _save_bytes(obj, str(tmp_path / "buffered.tk"), buffered_spy)
    assert buffered_spy.switches == [] and buffered_spy.truncations == []
    assert direct_bytes == buffered_bytes
    back = torchkeep.load(str(tmp_path / "direct.tk"))
    assert back.keys() == obj.keys()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    sizes=st.lists(st.integers(0, 20_000), min_size=1, max_size=12),
    segment_blocks=st.integers(1, 4),
    hash_chunk=st.integers(1, 30_000),
    meta_len=st.integers(0, 6000),
    small=st.sampled_from([0, 100, 5000]),
)
def test_direct_bytes_match_for_any_layout(sizes, segment_blocks, hash_chunk, meta_len, small):
    """Entry sizes, segment size, hash chunk and header length (through the metadata) drawn at
    random: the file is byte-identical to a buffered save and loads back equal."""
    obj = {f"e{i}": torch.arange(n, dtype=torch.uint8) for i, n in enumerate(sizes)}
    metadata = {"note": "x" * meta_len}
    with tempfile.TemporaryDirectory() as tmp:
        if not direct_io_supported(tmp):
            return
        saved = (
            knobs.DIRECT_MIN_BYTES,
            knobs.DIRECT_CHUNK_BYTES,
            knobs.CHUNK_BYTES,
            knobs.SMALL_TENSOR_BYTES,
        )
        try:
            knobs.DIRECT_MIN_BYTES, knobs.CHUNK_BYTES = 1, hash_chunk
            knobs.DIRECT_CHUNK_BYTES = 4096 * segment_blocks
            knobs.SMALL_TENSOR_BYTES = small
            spy = SpyOps()
            with use_ops(spy):
                torchkeep.save(obj, os.path.join(tmp, "d.tk"), metadata=metadata)
            knobs.DIRECT_MIN_BYTES = 1 << 62
            torchkeep.save(obj, os.path.join(tmp, "b.tk"), metadata=metadata)
        finally:
            (
                knobs.DIRECT_MIN_BYTES,
                knobs.DIRECT_CHUNK_BYTES,
                knobs.CHUNK_BYTES,
                knobs.SMALL_TENSOR_BYTES,
            ) = saved
        direct_used = spy.switches[:1] == [True]
        with open(os.path.join(tmp, "d.tk"), "rb") as a, open(os.path.join(tmp, "b.tk"), "rb") as b:
            assert a.read() == b.read()
        back = torchkeep.load(os.path.join(tmp, "d.tk"))
        assert all(torch.equal(back[k], v) for k, v in obj.items())
        assert direct_used == any(n > small for n in sizes)  # only large tensors count


class RefusingOps(SpyOps):
    """A filesystem that accepts O_DIRECT but refuses direct writes with EINVAL (some FUSE)."""

    def __init__(self) -> None:
        super().__init__()
        self.direct_on = False
        self.refused = 0

    def set_direct(self, fd: int, enable: bool) -> bool:
        self.switches.append(enable)
        self.direct_on = enable
        return True

    def pwrite(self, fd: int, data: memoryview, offset: int) -> int:
        if self.direct_on:
            self.refused += 1
            raise OSError(errno.EINVAL, "Invalid argument")
        return super().pwrite(fd, data, offset)


def test_filesystem_refusing_direct_writes_falls_back_to_buffered(direct, tmp_path):
    obj = _objects()["mixed"]
    ops = RefusingOps()
    path = str(tmp_path / "x.tk")
    with use_ops(ops):
        torchkeep.save(obj, path)
    assert ops.refused >= 1 and ops.switches[0] is True and False in ops.switches
    back = torchkeep.load(path)
    assert torch.equal(back["w"], obj["w"]) and back["meta"] == obj["meta"]


class NoDirectOps(SpyOps):
    def set_direct(self, fd: int, enable: bool) -> bool:
        self.switches.append(False)
        return False


def test_filesystem_without_direct_io_is_written_buffered(direct, tmp_path):
    ops = NoDirectOps()
    path = str(tmp_path / "x.tk")
    with use_ops(ops):
        torchkeep.save(_objects()["one_big"], path)
    assert ops.truncations == []  # the buffered path ran
    assert torch.equal(torchkeep.load(path)["x"], _objects()["one_big"]["x"])


class FailingOps(FileOps):
    """EIO on the third write of a save."""

    def __init__(self) -> None:
        self.writes = 0

    def pwrite(self, fd: int, data: memoryview, offset: int) -> int:
        self.writes += 1
        if self.writes == 3:
            raise OSError(errno.EIO, "injected EIO")
        return super().pwrite(fd, data, offset)


def test_error_during_direct_write_keeps_the_previous_file(direct, tmp_path):
    path = str(tmp_path / "x.tk")
    old = {"x": torch.zeros(50_000)}
    torchkeep.save(old, path)
    with use_ops(FailingOps()), pytest.raises(torchkeep.StorageError, match="I/O error"):
        torchkeep.save(_objects()["one_big"], path)
    assert torch.equal(torchkeep.load(path)["x"], old["x"])
    assert os.listdir(tmp_path) == ["x.tk"]  # no temporary left behind


def test_staging_buffers_are_reused_and_bounded(direct, tmp_path):
    obj = {"x": torch.randn(200_000)}  # 800 KB: ~100 segments of 8 KiB
    torchkeep.save(obj, str(tmp_path / "a.tk"))
    first = {id(b) for b in STAGING._free}
    torchkeep.save(obj, str(tmp_path / "b.tk"))
    second = {id(b) for b in STAGING._free}
    assert first and first == second
    assert len(second) <= knobs.IO_THREADS


def test_async_and_manager_saves_take_the_direct_path(direct, tmp_path):
    obj = _objects()["mixed"]
    spy = SpyOps()
    with use_ops(spy):
        torchkeep.save_async(obj, str(tmp_path / "a.tk")).wait()
        with torchkeep.CheckpointManager(str(tmp_path / "run"), rng=False) as manager:
            manager.save(1, {"weights": obj})
    assert spy.switches.count(True) == 2
    assert torch.equal(torchkeep.load(str(tmp_path / "a.tk"))["view"], obj["view"])


def _planned(sizes: list[int]) -> list:
    return prepare(
        {f"t{i}": torch.empty(n, dtype=torch.uint8) for i, n in enumerate(sizes)}
    ).entries


def test_which_files_are_written_direct(monkeypatch):
    """Direct I/O only when large tensors hold DIRECT_MIN_BYTES; many small ones stay buffered."""
    monkeypatch.setattr(knobs, "DIRECT_MIN_BYTES", 32 << 20)
    monkeypatch.setattr(knobs, "SMALL_TENSOR_BYTES", 256 << 10)
    assert not wants_direct(_planned([1 << 20]))  # too small a file
    assert wants_direct(_planned([40 << 20, 100]))
    assert not wants_direct(_planned([4096] * 10_000))  # 40 MB, but in small tensors only
    assert wants_direct(_planned([4096] * 1000 + [33 << 20]))
    assert not wants_direct(_planned([]))
    monkeypatch.setattr(knobs, "DIRECT_IO", 0)
    assert not wants_direct(_planned([40 << 20]))


def test_data_ending_inside_the_header_block(direct, tmp_path):
    """Regression: 3 KB of data behind a header padded past 4 KiB ends inside the head block,
    and no segment may be written with a negative length."""
    obj = {"e": torch.arange(3004, dtype=torch.uint8)}
    spy = SpyOps()
    path = str(tmp_path / "x.tk")
    with use_ops(spy):
        torchkeep.save(obj, path, metadata={"note": "x" * 3000})
    assert spy.switches[0] is True
    assert torch.equal(torchkeep.load(path)["e"], obj["e"])
    assert spy.truncations == [os.path.getsize(path)]


def test_aligned_buffer_refuses_copies_that_overrun():
    buffer = AlignedBuffer(4096)
    source = torch.arange(16, dtype=torch.uint8)
    buffer.copy_in(4080, source.data_ptr(), 16)
    assert bytes(buffer.view[4080:]) == bytes(range(16))
    assert buffer.address % mmap.PAGESIZE == 0
    for at, n in ((4081, 16), (-1, 1), (0, 4097), (5, -1)):
        with pytest.raises(ValueError, match="do not fit"):
            buffer.copy_in(at, source.data_ptr(), n)
        with pytest.raises(ValueError, match="do not fit"):
            buffer.zero(at, n)


def test_buffer_pool_reuses_one_size_and_keeps_a_bounded_number():
    pool = BufferPool()
    a, b, c = pool.take(4096), pool.take(4096), pool.take(4096)
    for buffer in (a, b, c):
        pool.give(buffer, keep=2)
    assert len(pool._free) == 2
    again = pool.take(4096)
    assert again in (a, b)
    other = pool.take(8192)  # a new size drops buffers of the old one
    assert other.size == 8192 and pool._free == []


def _count_copies(monkeypatch) -> list[int]:
    copies: list[int] = []
    original = AlignedBuffer.copy_in

    def counting(self, at: int, address: int, nbytes: int) -> None:
        copies.append(nbytes)
        original(self, at, address, nbytes)

    monkeypatch.setattr(AlignedBuffer, "copy_in", counting)
    return copies


def test_async_snapshot_is_written_without_a_second_copy(direct, monkeypatch, tmp_path):
    """The snapshot is laid out as the file's image, so direct writes go straight from it."""
    copies = _count_copies(monkeypatch)
    obj = _objects()["mixed"]
    torchkeep.save_async(obj, str(tmp_path / "a.tk")).wait()
    assert copies == []
    torchkeep.save(obj, str(tmp_path / "s.tk"))  # the sync save stages through copies
    assert sum(copies) > 0
    assert (tmp_path / "a.tk").read_bytes() == (tmp_path / "s.tk").read_bytes()


def test_reused_snapshot_image_leaves_no_stale_bytes(direct, tmp_path):
    """The staging buffer is reused: a smaller save after a larger one must not write the
    larger one's bytes into its padding (or anywhere)."""
    torchkeep.save_async({"x": torch.full((50_000,), 7.0)}, str(tmp_path / "big.tk")).wait()
    small = {"y": torch.arange(1001, dtype=torch.uint8), "z": torch.ones(3000)}
    torchkeep.save_async(small, str(tmp_path / "a.tk")).wait()
    torchkeep.save(small, str(tmp_path / "s.tk"))
    assert (tmp_path / "a.tk").read_bytes() == (tmp_path / "s.tk").read_bytes()


def test_snapshot_image_misaligned_for_the_writer_is_copied(direct, monkeypatch, tmp_path):
    """A knob changed between snapshot and write: the writer copies instead of trusting it."""
    obj = _objects()["one_big"]
    prepared = Stager().stage(prepare(obj))
    alignment = 1 << 20
    while prepared.image.data_ptr() % alignment == 0:
        alignment <<= 1
    monkeypatch.setattr(knobs, "DIRECT_ALIGN", alignment)
    copies = _count_copies(monkeypatch)
    write_file(prepared, str(tmp_path / "a.tk"))
    assert sum(copies) > 0
    monkeypatch.setattr(knobs, "DIRECT_IO", 0)
    torchkeep.save(obj, str(tmp_path / "s.tk"))
    assert (tmp_path / "a.tk").read_bytes() == (tmp_path / "s.tk").read_bytes()


def test_async_save_with_512_byte_alignment(direct, monkeypatch, tmp_path):
    """DIRECT_ALIGN below the page size: the snapshot image is aligned to 512 bytes only and
    must still be written from (O_DIRECT needs block alignment, not page alignment)."""
    monkeypatch.setattr(knobs, "DIRECT_ALIGN", 512)
    copies = _count_copies(monkeypatch)
    obj = _objects()["mixed"]
    torchkeep.save_async(obj, str(tmp_path / "a.tk")).wait()
    assert copies == []
    monkeypatch.setattr(knobs, "DIRECT_IO", 0)
    torchkeep.save(obj, str(tmp_path / "s.tk"))
    assert (tmp_path / "a.tk").read_bytes() == (tmp_path / "s.tk").read_bytes()
