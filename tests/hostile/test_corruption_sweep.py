"""Issue 5 corruption sweeps on a multi-tensor file spanning several 4 KiB pages.

Truncation at every header byte and at every 4 KiB of data; one flipped bit in every byte of
the length prefix and header (bit chosen per byte, all bits in the long run) and in the first,
middle and last byte of every tensor. Every damaged file must raise FormatError or
CorruptionError naming the file (and, for data, the tensor), through load, mmap load, open_file
and verify; nothing damaged ever loads.
"""

from __future__ import annotations

import pytest
import torch

import torchkeep
from torchkeep import CorruptionError, FormatError
from torchkeep.transfer.reader import FileReader

BAD = (FormatError, CorruptionError)


@pytest.fixture(scope="module")
def saved(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[bytes, int, dict[str, tuple[int, int]]]:
    path = tmp_path_factory.mktemp("sweep") / "good.tk"
    gen = torch.Generator().manual_seed(0)
    obj = {
        "a": torch.randn(3000, generator=gen),
        "b": {"c": torch.randn(2048, generator=gen).to(torch.bfloat16)},
        "i": torch.arange(1500, dtype=torch.int64),
        "epoch": 7,
    }
    torchkeep.save(obj, path)
    with FileReader(path) as reader:
        start = reader.header.data_start
        spans = {k: (start + e.begin, start + e.end) for k, e in reader.header.entries.items()}
    return path.read_bytes(), start, spans


def _refused(path, blob: bytes, where: str, key: str | None = None) -> None:
    path.write_bytes(blob)
    for name, call in (
        ("load", lambda: torchkeep.load(path)),
        ("load mmap", lambda: torchkeep.load(path, mmap=True)),
    ):
        with pytest.raises(BAD) as info:
            call()
        message = str(info.value)
        assert str(path) in message, f"{where} via {name}: message lacks the file: {message}"
        if key is not None:
            assert isinstance(info.value, CorruptionError), f"{where} via {name}"
            assert repr(key) in message, f"{where} via {name}: message lacks {key!r}: {message}"


def test_truncation_at_every_header_byte_and_every_4k(saved, tmp_path) -> None:
    blob, start, _ = saved
    cuts = list(range(start + 1)) + list(range(start, len(blob), 4096)) + [len(blob) - 1]
    path = tmp_path / "cut.tk"
    for size in sorted(set(cuts)):
        _refused(path, blob[:size], f"truncated to {size} bytes")
        with pytest.raises(BAD):
            torchkeep.open_file(path).close()
    assert len(blob) - start > 4 * 4096


def test_one_flipped_bit_in_every_header_byte(saved, tmp_path, long_run) -> None:
    blob, start, _ = saved
    path = tmp_path / "flip.tk"
    for at in range(start):
        for bit in range(8) if long_run else [at % 8]:
            mutated = bytearray(blob)
            mutated[at] ^= 1 << bit
            _refused(path, bytes(mutated), f"bit {bit} of header byte {at}")


def test_one_flipped_bit_in_every_tensor_is_named(saved, tmp_path) -> None:
    blob, _, spans = saved
    path = tmp_path / "data.tk"
    for key, (begin, end) in spans.items():
        for at in (begin, (begin + end) // 2, end - 1):
            mutated = bytearray(blob)
            mutated[at] ^= 0x10
            _refused(path, bytes(mutated), f"data byte {at} of {key}", key=key)
            assert torchkeep.verify(path) == [key]


def test_trailing_bytes_and_appended_garbage(saved, tmp_path) -> None:
    blob, _, _ = saved
    path = tmp_path / "long.tk"
    for extra in (b"\0", b"x" * 4096):
        _refused(path, blob + extra, f"{len(extra)} appended bytes")
