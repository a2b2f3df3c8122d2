"""The verification pass that runs before a load changes anything (transfer/hashing.py):
parallel hashing from a read-only mapping of local files, through buffers for objects."""

from __future__ import annotations

import os
import random

import pytest
import torch

import torchkeep
from torchkeep import knobs
from torchkeep.errors import CorruptionError, FormatError
from torchkeep.format import checksum
from torchkeep.transfer import hashing, pool
from torchkeep.transfer.reader import FileReader


def _state(seed: int) -> dict[str, torch.Tensor]:
    rng = random.Random(seed)
    sizes = [0, 1, 3, 4096, 65537, 1 << 20, rng.randrange(1, 3 << 20)]
    rng.shuffle(sizes)
    gen = torch.Generator().manual_seed(seed)
    return {f"t{i}": torch.randint(0, 255, (n,), dtype=torch.uint8, generator=gen)
            for i, n in enumerate(sizes)}  # fmt: skip


def _spans(reader: FileReader) -> list[hashing.Span]:
    start = reader.header.data_start
    return [(k, start + e.begin, e.nbytes) for k, e in reader.header.entries.items()]


def _expected(path: str, spans: list[hashing.Span]) -> dict[str, str]:
    with open(path, "rb") as f:
        blob = f.read()
    return {k: checksum.digest(blob[lo : lo + n]) for k, lo, n in spans}


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize(("threads", "map_piece"), [(1, 8 << 20), (3, 4096), (2, 12288)])
def test_mapped_and_buffered_digests_match_the_bytes(
    tmp_path, monkeypatch, seed, threads, map_piece
):
    monkeypatch.setattr(knobs, "IO_THREADS", threads)
    monkeypatch.setattr(knobs, "VERIFY_MAP_PIECE_BYTES", map_piece)
    path = str(tmp_path / "f.tk")
    torchkeep.save(_state(seed), path)
    with FileReader(path) as reader:
        spans = _spans(reader)
        expected = _expected(path, spans)
        assert hashing.mapped_digests(reader._fd, reader.size, spans, path) == expected
        small = [s for s in spans if s[2] <= 65537]
        for piece, some in ((1, small), (7, small), (4093, spans), (1 << 20, spans)):
            digests = hashing.buffered_digests(reader._preadinto, some, piece)
            assert digests == {k: expected[k] for k, _, _ in some}
        assert reader.corrupt_entries() == []


def _corrupt(path: str, reader: FileReader, key: str) -> None:
    entry = reader.entry(key)
    with open(path, "r+b") as f:
        f.seek(reader.header.data_start + entry.begin + entry.nbytes // 2)
        byte = f.read(1)[0]
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte ^ 0x40]))


def test_every_corrupt_entry_is_found_and_the_first_in_file_order_is_raised(tmp_path):
    path = str(tmp_path / "f.tk")
    torchkeep.save({f"w{i}": torch.full((1000 + i,), float(i)) for i in range(8)}, path)
    with FileReader(path) as reader:
        order = sorted(reader.header.entries, key=lambda k: reader.entry(k).begin)
        victims = [order[5], order[2]]
        for key in victims:
            _corrupt(path, reader, key)
    with FileReader(path) as reader:
        assert sorted(reader.corrupt_entries()) == sorted(victims)
        with pytest.raises(CorruptionError, match=f"tensor '{order[2]}' is corrupt"):
            reader.verify_many(order[::-1])
        reader.verify_many([order[0], order[7]])  # intact entries pass


def test_a_file_that_shrank_while_open_is_refused_before_mapping(tmp_path):
    path = str(tmp_path / "f.tk")
    torchkeep.save({"w": torch.ones(4096)}, path)
    with FileReader(path) as reader:
        os.truncate(path, reader.size - 100)
        with pytest.raises(FormatError, match="shrank while it was open"):
            reader.verify_many(["w"])


def test_an_error_in_one_lane_reaches_the_caller_and_releases_the_mapping(tmp_path, monkeypatch):
    path = str(tmp_path / "f.tk")
    torchkeep.save({f"w{i}": torch.ones(5000) for i in range(6)}, path)
    calls = []
    real = checksum.new_hasher

    def failing():
        calls.append(1)
        if len(calls) == 3:
            raise OSError("injected hashing failure")
        return real()

    monkeypatch.setattr(checksum, "new_hasher", failing)
    with FileReader(path) as reader, pytest.raises(OSError, match="injected"):
        reader.verify_many(list(reader.header.entries))  # closing the mapping did not fail
    monkeypatch.setattr(checksum, "new_hasher", real)
    with FileReader(path) as reader:
        reader.verify_many(list(reader.header.entries))


def test_only_empty_entries(tmp_path):
    path = str(tmp_path / "f.tk")
    torchkeep.save({"a": torch.empty(0), "b": torch.empty(0, 3)}, path)
    with FileReader(path) as reader:
        reader.verify_many(["a", "b"])
        assert reader.corrupt_entries() == []
        assert hashing.mapped_digests(reader._fd, 0, [("a", 0, 0)], path) == {
            "a": checksum.digest(b"")
        }


def _fail(*args, **kwargs):
    raise AssertionError("this hashing path must not be taken")


@pytest.mark.parametrize("mode", [0o644, 0o600, 0o664, 0o646])
def test_only_files_nobody_else_can_write_are_mapped(tmp_path, monkeypatch, mode):
    """A mapping of a file someone else truncates kills the reader with SIGBUS, so files that
    others can write are hashed through pread; verification gives the same answer either way."""
    path = str(tmp_path / "f.tk")
    torchkeep.save({"a": torch.arange(5000.0), "b": torch.ones(300)}, path)
    os.chmod(path, mode)
    shared = bool(mode & 0o022)
    monkeypatch.setattr(hashing, "looks_cached", lambda fd, spans: True)
    monkeypatch.setattr(hashing, "mapped_digests" if shared else "buffered_digests", _fail)
    with FileReader(path) as reader:
        assert hashing.safe_to_map(reader._fd) is not shared
        reader.verify_many(["a", "b"])
        _corrupt(path, reader, "b")
        with pytest.raises(CorruptionError, match="'b' is corrupt"):
            reader.verify_many(["a", "b"])
        assert reader.corrupt_entries() == ["b"]


def test_a_file_owned_by_another_user_is_not_mapped(tmp_path, monkeypatch):
    path = str(tmp_path / "f.tk")
    torchkeep.save({"a": torch.ones(10)}, path)
    monkeypatch.setattr(os, "geteuid", lambda: os.stat(path).st_uid + 1)
    with FileReader(path) as reader:
        assert not hashing.safe_to_map(reader._fd)


def test_a_small_file_is_verified_without_starting_threads(tmp_path, monkeypatch):
    """Neighbouring small entries are hashed as one task by the caller (a forking parent
    stays single-threaded), large ones are shared out."""
    path = str(tmp_path / "f.tk")
    torchkeep.save({f"w{i}": torch.ones(1000) for i in range(50)}, path)
    monkeypatch.setattr(pool, "io_pool", _fail)
    for mode in (0o644, 0o664):  # mapped, then through pread
        os.chmod(path, mode)
        with FileReader(path) as reader:
            reader.verify_many(list(reader.header.entries))
            assert reader.corrupt_entries() == []
    spans = [(f"k{i}", i * 1000, 1000) for i in range(50)]
    assert len(hashing._batches(spans, 1 << 20)) == 1
    big = [(f"k{i}", i << 20, 1 << 20) for i in range(6)]
    assert [len(g) for g in hashing._batches(big, 2 << 20)] == [2, 2, 2]
    assert [len(g) for g in hashing._batches(big, 0)] == [1] * 6


def _peak_rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def test_the_mapped_pass_does_not_grow_rss_by_the_file(tmp_path, monkeypatch):
    """Each hashed piece's pages are dropped from the process, so a verified load's RSS grows
    by a few pieces, not by the file (as it would with the whole file mapped)."""
    path = str(tmp_path / "big.tk")
    torchkeep.save({f"w{i}": torch.ones(8 << 20, dtype=torch.uint8) * i for i in range(24)}, path)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
    except OSError:
        pytest.skip("cannot reset the peak-RSS counter here")
    monkeypatch.setattr(hashing, "buffered_digests", _fail)  # the mapped pass is measured
    monkeypatch.setattr(hashing, "looks_cached", lambda fd, spans: True)
    with FileReader(path) as reader:
        start = _peak_rss()
        reader.verify_many(list(reader.header.entries))
        grown = _peak_rss() - start
    pieces = (knobs.IO_THREADS + 1) * knobs.VERIFY_MAP_PIECE_BYTES
    assert grown <= pieces + (16 << 20), f"RSS grew by {grown >> 20} MiB for a 192 MiB file"


def _on_tmpfs(path: str) -> bool:
    best, kind = "", ""
    with open("/proc/mounts") as f:
        for line in f:
            point, fstype = line.split()[1:3]
            if path.startswith(point) and len(point) > len(best):
                best, kind = point, fstype
    return kind in ("tmpfs", "ramfs")


def test_a_file_is_mapped_only_once_it_is_in_the_page_cache(tmp_path, monkeypatch):
    """An uncached file is hashed with pread (the kernel reads ahead in large pieces); once
    cached, it is hashed from a mapping."""
    path = str(tmp_path / "f.tk")
    torchkeep.save({"a": torch.ones(1 << 20), "b": torch.zeros(1 << 18)}, path)
    with open(path, "rb") as f:
        f.read()  # cached now
    with FileReader(path) as reader:
        spans = _spans(reader)
        assert hashing.looks_cached(reader._fd, spans)
        assert not hashing.looks_cached(reader._fd, [])
        if _on_tmpfs(path):
            pytest.skip("tmpfs files are always in memory")
        os.fsync(reader._fd)
        os.posix_fadvise(reader._fd, 0, 0, os.POSIX_FADV_DONTNEED)
        assert not hashing.looks_cached(reader._fd, spans)
        monkeypatch.setattr(hashing, "looks_cached", lambda fd, spans: False)
        monkeypatch.setattr(hashing, "mapped_digests", _fail)
        reader.verify_many(list(reader.header.entries))  # not cached: through pread


def test_a_file_that_cannot_be_mapped_is_read_instead(tmp_path, monkeypatch):
    """No address space for the mapping (RLIMIT_AS) is not an error: the pass reads the file."""
    path = str(tmp_path / "f.tk")
    torchkeep.save({"a": torch.arange(3000.0), "b": torch.ones(7)}, path)

    def no_room(*args, **kwargs):
        raise OSError(12, "Cannot allocate memory")

    monkeypatch.setattr(hashing.mmap, "mmap", no_room)
    monkeypatch.setattr(hashing, "looks_cached", lambda fd, spans: True)
    with FileReader(path) as reader:
        assert hashing.mapped_digests(reader._fd, reader.size, _spans(reader), path) is None
        reader.verify_many(["a", "b"])
        _corrupt(path, reader, "a")
        assert reader.corrupt_entries() == ["a"]
