"""Correctness of the I/O hot paths: chunking, batching, thread-pool writes and parallel reads."""

from __future__ import annotations

import errno
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file
from torch import nn

import torchkeep
from torchkeep import knobs
from torchkeep.errors import CorruptionError, FormatError, StorageError
from torchkeep.storage.io import FileOps, use_ops
from torchkeep.transfer.reader import FileReader

DTYPES = [torch.float32, torch.bfloat16, torch.int64, torch.uint8, torch.float16]


def _state(sizes: list[int], seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i, n in enumerate(sizes):
        dtype = DTYPES[i % len(DTYPES)]
        t = torch.randint(0, 255, (n,), generator=g, dtype=torch.int64).to(dtype)
        out[f"t{i}"] = t
    return out


def _knobs(monkeypatch: pytest.MonkeyPatch, chunk: int, small: int, batch: int, threads: int):
    monkeypatch.setattr(knobs, "CHUNK_BYTES", chunk)
    monkeypatch.setattr(knobs, "READ_CHUNK_BYTES", chunk)  # large entries read in many pieces
    monkeypatch.setattr(knobs, "SMALL_TENSOR_BYTES", small)
    monkeypatch.setattr(knobs, "BATCH_BYTES", batch)
    monkeypatch.setattr(knobs, "IO_THREADS", threads)
    monkeypatch.setattr(knobs, "DIRECT_IO", 0)  # these tests count the buffered writer's writes


def _assert_same(a: dict, b: dict) -> None:
    assert list(a) == list(b) or set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


class Flat(nn.Module):
    """A module whose buffers mirror a flat state dict (any dtype)."""

    def __init__(self, like: dict[str, torch.Tensor]) -> None:
        super().__init__()
        for k, v in like.items():
            self.register_buffer(k, torch.zeros_like(v))


KNOB_SETS = [
    (1, 0, 1, 1),  # every byte its own chunk, nothing batched
    (7, 16, 64, 3),  # odd chunk size, tiny batches, more threads than chunks
    (64, 1 << 20, 1 << 20, 2),  # everything batched together
    (1 << 26, 256 * 1024, 8 << 20, 4),  # the defaults
]


@pytest.mark.parametrize("chunk,small,batch,threads", KNOB_SETS)
def test_roundtrip_across_knobs(tmp_path, monkeypatch, chunk, small, batch, threads):
    _knobs(monkeypatch, chunk, small, batch, threads)
    sd = _state([0, 1, 3, 8, 63, 64, 65, 200, 1000, 5])
    path = tmp_path / "m.tk"
    torchkeep.save(sd, path)
    _assert_same(load_file(str(path)), sd)  # stock safetensors reads it
    _assert_same(torchkeep.load(path, verify=True), sd)
    model = Flat(sd)
    torchkeep.load_state_dict(model, path, verify=True)
    _assert_same(dict(model.state_dict()), sd)


@settings(max_examples=25, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 300), min_size=1, max_size=12),
    chunk=st.integers(1, 97),
    small=st.integers(0, 400),
    batch=st.integers(1, 700),
    threads=st.integers(1, 4),
    keep=st.integers(0, 2**12 - 1),
    piece=st.integers(1, 900),
    read_chunk=st.integers(1, 300),
)
def test_property_partial_loads(
    tmp_path_factory, sizes, chunk, small, batch, threads, keep, piece, read_chunk
):
    """Any knob values, any subset of keys (gaps between batched entries) load exactly."""
    saved = (knobs.CHUNK_BYTES, knobs.SMALL_TENSOR_BYTES, knobs.BATCH_BYTES, knobs.IO_THREADS)
    saved_piece = knobs.READ_PIECE_BYTES, knobs.READ_CHUNK_BYTES
    knobs.CHUNK_BYTES, knobs.SMALL_TENSOR_BYTES, knobs.BATCH_BYTES = chunk, small, batch
    knobs.IO_THREADS, knobs.READ_PIECE_BYTES = threads, piece
    knobs.READ_CHUNK_BYTES = read_chunk
    try:
        sd = _state(sizes, seed=len(sizes))
        path = tmp_path_factory.mktemp("p") / "m.tk"
        torchkeep.save(sd, path)
        subset = {k: v for i, (k, v) in enumerate(sd.items()) if keep >> i & 1}
        model = Flat(subset)
        report = torchkeep.load_state_dict(model, path, strict=False)
        assert sorted(report.loaded) == sorted(subset)
        _assert_same(dict(model.state_dict()), subset)
    finally:
        knobs.CHUNK_BYTES, knobs.SMALL_TENSOR_BYTES, knobs.BATCH_BYTES, knobs.IO_THREADS = saved
        knobs.READ_PIECE_BYTES, knobs.READ_CHUNK_BYTES = saved_piece


class FailingOps(FileOps):
    """Fails the n-th data write with ENOSPC (writes run on the pool's threads)."""

    def __init__(self, fail_at: int) -> None:
        self.fail_at, self.calls = fail_at, 0

    def pwrite(self, fd: int, data: memoryview, offset: int) -> int:
        self.calls += 1
        if self.calls == self.fail_at:
            raise OSError(errno.ENOSPC, "No space left on device")
        return super().pwrite(fd, data, offset)


@pytest.mark.parametrize("fail_at", [2, 5, 40])
def test_worker_write_error_propagates(tmp_path, monkeypatch, fail_at):
    _knobs(monkeypatch, 16, 8, 32, 3)
    sd = _state([100, 3, 4, 50, 2, 7, 90])
    path = tmp_path / "m.tk"
    with use_ops(FailingOps(fail_at)), pytest.raises(StorageError, match="disk is full"):
        torchkeep.save(sd, path)
    assert os.listdir(tmp_path) == []  # nothing committed, temporary removed


class ShortVectoredOps(FileOps):
    """Vectored writes that stop after at most ``cap`` bytes (inside a buffer, at its edge...)."""

    def __init__(self, cap: int) -> None:
        self.cap, self.calls = cap, 0

    def pwritev(self, fd: int, views: list, offset: int) -> int:
        self.calls += 1
        flat = b"".join(views)[: self.cap]
        return os.pwrite(fd, flat, offset)


@pytest.mark.parametrize("cap", [1, 7, 12, 4096])
def test_vectored_small_tensor_writes_resume_after_short_writes(tmp_path, monkeypatch, cap):
    _knobs(monkeypatch, 1 << 20, 1 << 10, 1 << 20, 2)  # everything is "small": one pwritev batch
    sd = _state([3, 100, 1, 2, 64, 5])
    sd["half"] = torch.arange(7, dtype=torch.bfloat16)  # no NumPy dtype: a byte view instead
    sd["scalar"] = torch.tensor(2.5)
    ops = ShortVectoredOps(cap)
    with use_ops(ops):
        torchkeep.save(sd, tmp_path / "m.tk")
    assert ops.calls > 1 or cap >= 4096
    _assert_same(torchkeep.load(tmp_path / "m.tk"), sd)


def test_writev_all_handles_every_split_point(tmp_path):
    """Short writes landing at every byte offset still write every buffer exactly once."""
    import numpy as np

    from torchkeep.storage.io import writev_all

    buffers = [
        np.arange(3, dtype=np.float32),
        memoryview(b"xy"),
        memoryview(b"abcdef"),
        np.array(1.5),  # zero-dimensional
    ]
    expected = b"".join(bytes(memoryview(b)) for b in buffers)
    for cap in range(1, len(expected) + 1):
        path = tmp_path / f"f{cap}"
        fd = os.open(path, os.O_CREAT | os.O_WRONLY)
        try:
            writev_all(ShortVectoredOps(cap), fd, list(buffers), 5)
        finally:
            os.close(fd)
        assert path.read_bytes() == b"\0" * 5 + expected, cap


def _flip_byte(path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


@pytest.mark.parametrize("victim", ["t0", "t3"])  # t0: many chunks; t3: inside a batch
def test_corruption_named_from_worker_threads(tmp_path, monkeypatch, victim):
    _knobs(monkeypatch, 32, 64, 256, 3)
    sd = {"t0": torch.arange(500, dtype=torch.float32)}
    sd.update({f"t{i}": torch.full((4,), float(i)) for i in range(1, 8)})
    path = tmp_path / "m.tk"
    torchkeep.save(sd, path)
    with FileReader(path) as r:
        _flip_byte(path, r.header.data_start + r.entry(victim).begin + 5)
    model = Flat(sd)
    with pytest.raises(CorruptionError, match=f"'{victim}'"):
        torchkeep.load_state_dict(model, path, verify=True)
    torchkeep.load_state_dict(model, path, verify=False)  # unverified load still reads it
    assert not torch.equal(getattr(model, victim), sd[victim])


@pytest.mark.parametrize("at", [5, 1500, 3999])  # first, a middle and the last piece of t0
def test_corruption_found_in_any_piece_of_a_verified_read(tmp_path, monkeypatch, at):
    _knobs(monkeypatch, 1 << 20, 1 << 20, 1 << 20, 2)  # one batch holding every tensor
    monkeypatch.setattr(knobs, "READ_PIECE_BYTES", 256)  # t0 (4,000 bytes) is read in pieces
    sd = {"t0": torch.arange(1000, dtype=torch.float32), "e": torch.zeros(0)}
    sd.update({f"t{i}": torch.full((4,), float(i)) for i in range(1, 5)})
    path = tmp_path / "m.tk"
    torchkeep.save(sd, path)
    model = Flat(sd)
    torchkeep.load_state_dict(model, path, verify=True)
    _assert_same(dict(model.state_dict()), sd)
    with FileReader(path) as r:
        _flip_byte(path, r.header.data_start + r.entry("t0").begin + at)
    with pytest.raises(CorruptionError, match="'t0'"):
        torchkeep.load_state_dict(Flat(sd), path, verify=True)


def test_truncated_after_open_raises_format_error(tmp_path, monkeypatch):
    _knobs(monkeypatch, 64, 16, 128, 2)
    sd = {"big": torch.arange(1000, dtype=torch.float32), "small": torch.ones(2)}
    path = tmp_path / "m.tk"
    torchkeep.save(sd, path)
    with FileReader(path) as r:
        os.truncate(path, r.header.data_start + 100)
        out = torch.empty(1000)
        with pytest.raises(FormatError, match="unexpected end of file"):
            r.read_into("big", out)


def test_tied_and_duplicate_destinations(tmp_path, monkeypatch):
    _knobs(monkeypatch, 8, 16, 64, 3)

    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(10, 4)
            self.head = nn.Linear(4, 10, bias=False)
            self.head.weight = self.emb.weight

    src = Tied()
    path = tmp_path / "tied.tk"
    torchkeep.save(src.state_dict(), path)
    dst = Tied()
    torchkeep.load_state_dict(dst, path)
    assert torch.equal(dst.emb.weight, src.emb.weight)
    assert dst.head.weight is dst.emb.weight
    with FileReader(path) as r:  # the same entry into two destinations in one call
        a, b = torch.empty(10, 4), torch.empty(10, 4)
        r.read_many([("emb.weight", a), ("emb.weight", b)])
        assert torch.equal(a, src.emb.weight) and torch.equal(b, src.emb.weight)


def test_read_into_rejects_bad_destinations(tmp_path):
    path = tmp_path / "m.tk"
    torchkeep.save({"w": torch.ones(4, 4)}, path)
    with FileReader(path) as r:
        with pytest.raises(ValueError, match="destination holds"):
            r.read_into("w", torch.empty(3))
        with pytest.raises(ValueError, match="contiguous"):
            r.read_into("w", torch.empty(4, 4).t())
        with pytest.raises(KeyError, match="no tensor named"):
            r.read_into("nope", torch.empty(16))


def test_noncontiguous_and_views_saved_exactly(tmp_path, monkeypatch):
    _knobs(monkeypatch, 5, 8, 32, 2)
    base = torch.arange(60, dtype=torch.float32).reshape(6, 10)
    obj = {"t": base.t(), "slice": base[2:4], "bf": base.to(torch.bfloat16)[::2]}
    path = tmp_path / "m.tk"
    torchkeep.save(obj, path)
    back = torchkeep.load(path)
    for k in obj:
        assert torch.equal(back[k], obj[k]), k


@pytest.mark.parametrize(
    "obj,meta",
    [
        ({}, {}),
        ({"w": torch.ones(3), 'é"k': torch.zeros(2, dtype=torch.bfloat16)}, {"note": 'q"ü'}),
        (
            {"torchkeep.header_checksum": torch.ones(1), "x": [1, "0000000000000000"]},
            {"v": '"torchkeep.checksums":"x"'},
        ),
    ],
)
def test_patched_final_header_equals_full_encoding(obj, meta):
    """The final header is patched into the placeholder; it must equal a full re-encoding."""
    import json as _json

    from torchkeep.format import checksum, header
    from torchkeep.transfer.writer import prepare

    prepared = prepare(obj, meta)
    sums = {e.key: f"{i:016x}" for i, e in enumerate(prepared.entries)}
    entries = {
        e.key: {"dtype": e.st_dtype, "shape": e.shape, "data_offsets": [e.begin, e.end]}
        for e in prepared.entries
    }
    full = {
        header.META_FORMAT: "pt",
        **meta,
        header.META_VERSION: header.FORMAT_VERSION,
        header.META_TREE: _json.dumps(prepared.tree, separators=(",", ":")),
        header.META_CHECKSUMS: _json.dumps(
            {"algorithm": checksum.ALGORITHM, "tensors": sums}, separators=(",", ":")
        ),
    }
    full[header.META_HEADER_SUM] = checksum.PLACEHOLDER
    assert prepared.header_bytes(sums) == header.seal(header.encode_header(entries, full))


@pytest.mark.parametrize("early", [0, 1])
def test_early_writeback_on_and_off(tmp_path, monkeypatch, early):
    monkeypatch.setattr(knobs, "EARLY_WRITEBACK", early)
    monkeypatch.setattr(knobs, "CHUNK_BYTES", 1 << 20)  # two 1 MiB chunks take the writeback path
    sd = {"w": torch.arange(512 * 1024, dtype=torch.float32), "b": torch.ones(3)}
    path = tmp_path / "m.tk"
    torchkeep.save(sd, path)
    _assert_same(load_file(str(path)), sd)


def test_lone_tensor_split_across_threads(tmp_path, monkeypatch):
    from torchkeep.transfer import parallel_read

    _knobs(monkeypatch, 1 << 20, 16, 64, 3)
    monkeypatch.setattr(parallel_read, "SPLIT_MIN_BYTES", 100)
    sd = {"w": torch.arange(1000, dtype=torch.float32), "b": torch.ones(2)}
    path = tmp_path / "m.tk"
    torchkeep.save(sd, path)
    with FileReader(path) as r:
        assert torch.equal(r.read_entry("w"), sd["w"])  # 4000 bytes in three ~1334-byte reads
        _flip_byte(path, r.header.data_start + r.entry("w").begin + 3990)
        with pytest.raises(CorruptionError, match="'w'"):
            r.read_entry("w")


@pytest.mark.parametrize(
    "size,lone,expected",
    [
        (100, False, 0),  # up to CHUNK_BYTES (1000): read whole, hashed by a worker
        (1000, False, 0),
        (1001, False, 64),  # larger: READ_CHUNK_BYTES pieces
        (30, True, 0),  # a lone tensor is split only above SPLIT_MIN_BYTES (40),
        (41, True, 40),  # one piece per thread, but none under SPLIT_MIN_BYTES
        (100, True, 40),  # (100 / 3 threads = 34)
        (150, True, 50),  # 150 / 3 threads
        (10_000, True, 64),  # never over READ_CHUNK_BYTES
    ],
)
def test_chunk_plan(monkeypatch, size, lone, expected):
    from torchkeep.transfer import parallel_read

    monkeypatch.setattr(knobs, "CHUNK_BYTES", 1000)
    monkeypatch.setattr(knobs, "READ_CHUNK_BYTES", 64)
    monkeypatch.setattr(knobs, "IO_THREADS", 3)
    monkeypatch.setattr(parallel_read, "SPLIT_MIN_BYTES", 40)
    assert parallel_read.chunk_plan(size, lone) == expected
    monkeypatch.setattr(knobs, "READ_CHUNK_BYTES", 16)  # pieces under SPLIT_MIN_BYTES:
    assert parallel_read.chunk_plan(min(size, 40), lone=True) == 0  # still not split up to it
    assert parallel_read.chunk_plan(41, lone=True) == 16


def test_large_entry_read_in_small_pieces_in_file_order(tmp_path, monkeypatch):
    """An entry over CHUNK_BYTES is read in READ_CHUNK_BYTES pieces that tile it in file order,
    whatever the order of the keys asked for; a flipped byte in a middle piece names the key."""
    from torchkeep.transfer import parallel_read

    _knobs(monkeypatch, 1000, 16, 64, 3)
    monkeypatch.setattr(knobs, "READ_CHUNK_BYTES", 300)
    sd = {"a": torch.ones(10), "big": torch.arange(1000, dtype=torch.float32), "z": torch.ones(3)}
    path = tmp_path / "m.tk"
    torchkeep.save(sd, path)
    model = Flat(sd)
    with FileReader(path) as r:
        items = [(k, model.get_buffer(k)) for k in ("z", "big", "a")]
        jobs = parallel_read.plan_reads(r, items)
        big = [j for j in jobs if j.chunk_of == "big"]
        start = r.header.data_start + r.entry("big").begin
        assert [j.offset - start for j in big] == list(range(0, 4000, 300))
        assert [j.last for j in big] == [False] * 13 + [True]
        assert [j.offset for j in jobs] == sorted(j.offset for j in jobs)
        _flip_byte(path, start + 1234)
    torchkeep.load_state_dict(model, path, verify=False)  # every other byte lands in place
    assert (model.big != sd["big"]).nonzero().flatten().tolist() == [1234 // 4]
    assert torch.equal(model.a, sd["a"]) and torch.equal(model.z, sd["z"])
    with pytest.raises(CorruptionError, match="'big'"):
        torchkeep.load_state_dict(model, path, verify=True)
