"""Overlapped snapshots hash while they copy (issue 23): ``memcopy.copy_and_hash``,
``pool.parallel_copy_hash``, and writers that take a snapshot's checksums instead of hashing
again, including the large direct-I/O writes made from a snapshot image."""

from __future__ import annotations

import os
import tempfile

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import torchkeep
from _direct import direct_io_supported
from torchkeep import CheckpointManager, knobs
from torchkeep.errors import CorruptionError
from torchkeep.format import checksum
from torchkeep.transfer import direct_writer, memcopy, overlap, writer
from torchkeep.transfer.pool import parallel_copy_hash
from torchkeep.transfer.reader import FileReader


@pytest.fixture(autouse=True)
def _no_hook():
    yield
    overlap.set_copy_hook(None)


@settings(max_examples=60, deadline=None)
@given(
    size=st.integers(0, 70_000),
    piece=st.integers(1, 20_000),
    streaming=st.booleans(),
    shift=st.integers(0, 63),
)
def test_copy_and_hash_copies_exactly_and_returns_the_checksum(size, piece, streaming, shift):
    rng = np.random.default_rng(size)
    src = rng.integers(0, 256, size + 64, dtype=np.uint8)[shift : shift + size]
    dst = np.full(size + 64, 0xA5, dtype=np.uint8)
    saved = knobs.SNAPSHOT_HASH_PIECE_BYTES, knobs.STREAMING_COPY
    try:
        knobs.SNAPSHOT_HASH_PIECE_BYTES, knobs.STREAMING_COPY = piece, int(streaming)
        digest = memcopy.copy_and_hash(dst[:size], src)
    finally:
        knobs.SNAPSHOT_HASH_PIECE_BYTES, knobs.STREAMING_COPY = saved
    assert digest == checksum.digest(src.tobytes())
    assert np.array_equal(dst[:size], src)
    assert (dst[size:] == 0xA5).all()  # nothing written past the end


def test_copy_and_hash_without_the_extension(monkeypatch):
    monkeypatch.setattr(memcopy, "_streamcopy", None)
    src = np.arange(3 << 20, dtype=np.uint32).view(np.uint8)
    dst = np.empty_like(src)
    assert memcopy.copy_and_hash(dst, src) == checksum.digest(src.tobytes())
    assert np.array_equal(dst, src)


def test_parallel_copy_hash_returns_each_pairs_checksum_in_order(monkeypatch):
    monkeypatch.setattr(knobs, "SNAPSHOT_HASH_PIECE_BYTES", 4096)
    rng = np.random.default_rng(0)
    sizes = [0, 1, 5000, 300_000, 17, 2_000_000, 4096]
    srcs = [rng.integers(0, 256, n, dtype=np.uint8) for n in sizes]
    dsts = [np.zeros(n, dtype=np.uint8) for n in sizes]
    sums = parallel_copy_hash(list(zip(dsts, srcs)))
    assert sums == [checksum.digest(s.tobytes()) for s in srcs]
    assert all(np.array_equal(d, s) for d, s in zip(dsts, srcs))
    assert parallel_copy_hash([]) == []


def test_parallel_copy_hash_error_reaches_the_caller(monkeypatch):
    def failing(dst, src):
        if src.nbytes == 3:
            raise OSError("simulated failure in one copy")
        return memcopy.copy_and_hash(dst, src)

    monkeypatch.setattr("torchkeep.transfer.pool.copy_and_hash", failing)
    pairs = [(np.zeros(n, np.uint8), np.ones(n, np.uint8)) for n in (10, 3, 1000)]
    with pytest.raises(OSError, match="simulated failure"):
        parallel_copy_hash(pairs)


def _trained() -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(300, 200), nn.BatchNorm1d(200), nn.Linear(200, 100))
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    model(torch.randn(8, 300)).pow(2).mean().backward()
    opt.step()
    opt.zero_grad()
    return model, opt


class _NoLargeHashing:
    """Stands in for ``format.checksum`` in the writers: small entries may still be hashed
    (buffers, step counters are copied before ``save`` returns), large ones must come hashed."""

    def __getattr__(self, name: str):
        return getattr(checksum, name)

    @staticmethod
    def new_hasher():
        raise AssertionError("the writer hashed a tensor the snapshot had already hashed")


@pytest.mark.parametrize("direct", [True, False])
def test_overlapped_save_writes_the_snapshots_checksums(direct, monkeypatch, tmp_path):
    """The background write takes the checksums computed during the copy (no second pass),
    and the file verifies: every recorded checksum is the hash of the bytes written."""
    # the RNG state (5 KB) is copied before save returns and hashed by the writer: "small" here
    monkeypatch.setattr(knobs, "SMALL_TENSOR_BYTES", 8192)
    monkeypatch.setattr(knobs, "DIRECT_MIN_BYTES", 1 if direct else 1 << 62)
    monkeypatch.setattr(direct_writer, "checksum", _NoLargeHashing())
    monkeypatch.setattr(writer, "checksum", _NoLargeHashing())
    model, opt = _trained()
    mgr = CheckpointManager(tmp_path, snapshot="overlap")
    mgr.save(1, {"model": model, "opt": opt})
    mgr.close()
    path = os.path.join(tmp_path, "step-0000000001", "state.tk")
    assert torchkeep.verify(path) == []
    with FileReader(path) as reader:
        assert not reader.corrupt_entries()
    expected = model.state_dict()
    loaded = torchkeep.load(tmp_path)["objects"]["model"]
    assert all(torch.equal(loaded[k], v) for k, v in expected.items())


def test_a_snapshot_checksum_that_disagrees_with_the_copy_fails_verification(monkeypatch, tmp_path):
    """What happens when a source changes between its copy and its hash without the version
    guard seeing it (a write through ``.data``): the file does not pass as good."""
    monkeypatch.setattr(knobs, "SMALL_TENSOR_BYTES", 1024)

    def wrong(dst, src):
        memcopy.copy_and_hash(dst, src)
        return "0" * 16

    monkeypatch.setattr(overlap, "copy_and_hash", wrong)
    overlap.set_copy_hook(lambda key: None)  # per-entry path: each entry goes through `wrong`
    model, opt = _trained()
    mgr = CheckpointManager(tmp_path, snapshot="overlap")
    mgr.save(1, {"model": model, "opt": opt})
    mgr.close()
    path = os.path.join(tmp_path, "step-0000000001", "state.tk")
    bad = torchkeep.verify(path)
    assert "objects.model.0.weight" in bad
    with pytest.raises(CorruptionError, match="0.weight"):
        CheckpointManager(tmp_path).restore({"model": model, "opt": opt})


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    sizes=st.lists(st.integers(1, 30_000), min_size=1, max_size=8),
    segment_blocks=st.integers(1, 5),
    small=st.sampled_from([0, 100, 5000]),
)
def test_image_writes_of_any_segment_size_match_a_sync_save(sizes, segment_blocks, small):
    """Overlapped (image, pre-hashed) and synchronous saves of the same state, with the image
    write's segment size and the small-tensor threshold drawn at random: same tensors, same
    checksums, both verify."""
    params = [nn.Parameter(torch.arange(n, dtype=torch.float32) / 7) for n in sizes]
    state = {"p": nn.ParameterList(params)}
    with tempfile.TemporaryDirectory() as tmp:
        saved = knobs.DIRECT_MIN_BYTES, knobs.DIRECT_IMAGE_CHUNK_BYTES, knobs.SMALL_TENSOR_BYTES
        try:
            knobs.DIRECT_MIN_BYTES = 1
            knobs.DIRECT_IMAGE_CHUNK_BYTES = 4096 * segment_blocks
            knobs.SMALL_TENSOR_BYTES = small
            for mode in ("overlap", "sync"):
                mgr = CheckpointManager(os.path.join(tmp, mode), snapshot=mode, rng=False)
                mgr.save(0, state)
                mgr.close()
        finally:
            knobs.DIRECT_MIN_BYTES, knobs.DIRECT_IMAGE_CHUNK_BYTES, knobs.SMALL_TENSOR_BYTES = saved
        files = [os.path.join(tmp, m, "step-0000000000", "state.tk") for m in ("overlap", "sync")]
        sums = []
        for path in files:
            assert torchkeep.verify(path) == []
            with FileReader(path) as reader:
                sums.append(reader.checksums)
        assert sums[0] == sums[1]
        if direct_io_supported(tmp):
            with open(files[0], "rb") as a, open(files[1], "rb") as b:
                assert a.read() == b.read()
