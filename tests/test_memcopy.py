"""Streaming copies for async-save snapshots (transfer/memcopy.py, _streamcopy.c):
byte-exact at every size and alignment, on both sides of the streaming threshold, and the
numpy fallback used where the extension is missing or switched off."""

from __future__ import annotations

import shutil
import sysconfig

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from torchkeep import knobs
from torchkeep.transfer import memcopy
from torchkeep.transfer.pool import parallel_copy

streamcopy = memcopy._streamcopy
# Sizes around the extension's own threshold exercise both of its paths (256 KiB without it).
STREAM_MIN = streamcopy.MIN_STREAM_BYTES if streamcopy else 256 * 1024
GUARD = 64


def test_the_extension_is_built_where_a_c_compiler_is():
    """`make test` installs with a compiler on this project's machines: a broken build (which
    setup.py tolerates, so users without a compiler can install) must not go unnoticed here."""
    compiler = (sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(compiler) is None:
        pytest.skip(f"no C compiler ({compiler}): torchkeep runs on its numpy fallback")
    assert streamcopy is not None, "torchkeep._streamcopy did not build; see `pip install -v`"
    on_x86_64 = sysconfig.get_platform().endswith("x86_64")
    assert streamcopy.MIN_STREAM_BYTES == 256 * 1024
    # Streaming stores on every x86-64 CPU and nowhere else, with the best instruction set the
    # CPU offers: AVX2 where /proc/cpuinfo says the CPU has it (a failed detection would
    # quietly fall back to SSE2), SSE2 on any other x86-64.
    if on_x86_64:
        assert (2 if _cpu_flag("avx2") else 1) == streamcopy.LEVEL
    else:
        assert streamcopy.LEVEL == 0


def _cpu_flag(flag: str) -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and flag in line.split() for line in f)
    except OSError:
        pytest.skip("no /proc/cpuinfo to tell what the CPU has")


needs_ext = pytest.mark.skipif(streamcopy is None, reason="extension not built")
#: Every instruction set this CPU can run (0 memcpy, 1 SSE2, 2 AVX2 streaming stores).
LEVELS = list(range(streamcopy.LEVEL + 1)) if streamcopy else []


def _copy_and_check(copy, size: int, dst_shift: int, src_shift: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    src_space = rng.integers(0, 256, size + 2 * GUARD, dtype=np.uint8)
    dst_space = np.full(size + 2 * GUARD, 0xA5, dtype=np.uint8)
    src = src_space[src_shift : src_shift + size]
    dst = dst_space[GUARD + dst_shift - GUARD // 2 :][:size]
    before = dst_space.copy()
    copy(dst, src)
    assert np.array_equal(dst, src)
    start = GUARD + dst_shift - GUARD // 2
    outside = np.ones(dst_space.size, dtype=bool)
    outside[start : start + size] = False
    assert np.array_equal(dst_space[outside], before[outside])  # not a byte written outside


@needs_ext
@settings(max_examples=60, deadline=None)
@given(
    size=st.one_of(
        st.integers(0, 4096),
        st.integers(STREAM_MIN - 200, STREAM_MIN + 200),
        st.integers(STREAM_MIN, 3 * STREAM_MIN),
    ),
    dst_shift=st.integers(0, 63),
    src_shift=st.integers(0, 63),
    seed=st.integers(0, 2**32 - 1),
    level=st.sampled_from(LEVELS or [0]),
)
def test_stream_copy_is_byte_exact_at_any_size_and_alignment(
    size, dst_shift, src_shift, seed, level
):
    _copy_and_check(lambda d, s: streamcopy.copy(d, s, level), size, dst_shift, src_shift, seed)


@needs_ext
@pytest.mark.parametrize("level", LEVELS)
def test_every_instruction_set_copies_the_same_bytes(level):
    """Each level, forced, on sizes that end mid-vector and destinations off every boundary."""
    for size in (STREAM_MIN, STREAM_MIN + 1, STREAM_MIN + 127, 3 * STREAM_MIN + 65):
        for shift in (0, 1, 15, 16, 31, 33):
            _copy_and_check(lambda d, s: streamcopy.copy(d, s, level), size, shift, 3, size)


@needs_ext
def test_stream_copy_refuses_a_level_the_cpu_lacks():
    with pytest.raises(ValueError, match="level 3 is not available here"):
        streamcopy.copy(bytearray(4), b"abcd", 3)
    with pytest.raises(ValueError, match="level -1 is not available here"):
        streamcopy.copy(bytearray(4), b"abcd", -1)


@needs_ext
def test_stream_copy_refuses_mismatched_and_read_only_buffers():
    with pytest.raises(ValueError, match="destination holds 3 bytes and the source 4"):
        streamcopy.copy(bytearray(3), b"abcd")
    with pytest.raises(TypeError):
        streamcopy.copy(b"immutable", b"abcdefghi")


@needs_ext
def test_stream_copy_of_overlapping_buffers_behaves_like_memmove():
    data = np.arange(STREAM_MIN * 2, dtype=np.uint8)
    expected = data.copy()
    expected[16:] = data[:-16].copy()
    streamcopy.copy(data[16:], data[:-16])
    assert np.array_equal(data, expected)


@pytest.mark.parametrize("mode", ["streaming", "knob off", "no extension"])
def test_copy_bytes_is_exact_in_every_mode(monkeypatch, mode):
    if mode == "knob off":
        monkeypatch.setattr(knobs, "STREAMING_COPY", 0)
    if mode == "no extension":
        monkeypatch.setattr(memcopy, "_streamcopy", None)
    if mode == "streaming" and not memcopy.streaming_available():
        pytest.skip("streaming stores not available here")
    assert memcopy.streaming_available() == (mode == "streaming")
    for size, shift in ((0, 0), (100, 3), (STREAM_MIN + 77, 5), (1 << 20, 0)):
        _copy_and_check(memcopy.copy_bytes, size, shift, 7, size)


def test_parallel_copy_of_large_pieces_is_exact(monkeypatch):
    monkeypatch.setattr(knobs, "IO_THREADS", 3)
    rng = np.random.default_rng(5)
    sizes = [3 * STREAM_MIN + 13, 1 << 20, 5 * STREAM_MIN]
    srcs = [rng.integers(0, 256, n, dtype=np.uint8) for n in sizes]
    dsts = [np.zeros(n + 1, dtype=np.uint8)[1:] for n in sizes]  # misaligned destinations
    parallel_copy(list(zip(dsts, srcs)), STREAM_MIN + 1)
    assert all(np.array_equal(d, s) for d, s in zip(dsts, srcs))
