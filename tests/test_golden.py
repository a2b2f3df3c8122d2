"""Golden bytes: a fixed object encodes to exactly the checked-in file, which keeps loading.

Regenerate (only on a deliberate format change, with a new FORMAT_VERSION):
``.venv/bin/python tests/test_golden.py``.
"""

from __future__ import annotations

import collections
import pathlib
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, str(pathlib.Path(__file__).parent))

import torchkeep  # noqa: E402
from _compare import assert_same  # noqa: E402
from torchkeep import knobs  # noqa: E402
from torchkeep.format import header  # noqa: E402

GOLDEN = pathlib.Path(__file__).parent / "golden"
#: Every format version ever written; each one's basic file must keep loading.
VERSIONS = ("1", "2")
BASIC = GOLDEN / f"v{header.FORMAT_VERSION}_basic.tk"
#: Deliberately broken copies of each version's basic file that must keep failing.
BROKEN = {
    f"v{v}_basic_{name}.tk": error
    for v in VERSIONS
    for name, error in (
        ("data_bitflip", torchkeep.CorruptionError),
        ("header_tampered", torchkeep.CorruptionError),
        ("truncated", torchkeep.FormatError),
    )
}


def golden_object() -> dict:
    """A small object touching every node kind of the format (versions 1 and 2 share them)."""
    weight = torch.arange(12, dtype=torch.float32).reshape(3, 4) / 4
    state = collections.OrderedDict(
        [("fc.weight", weight), ("fc.bias", torch.tensor([0.5, -1.0, 2.0]))]
    )
    state._metadata = collections.OrderedDict([("", {"version": 1}), ("fc", {"version": 1})])
    return {
        "epoch": 3,
        "model_state": state,
        "tied": weight,
        "row": weight[1],
        "optim_state": {
            "state": {0: {"step": torch.tensor(3.0), "momentum_buffer": torch.ones(3, 4)}},
            "param_groups": [{"lr": 0.1, "params": [0, 1], "nesterov": False, "foo": None}],
        },
        "dtypes": {
            "bf16": torch.tensor([1.5, -2.0], dtype=torch.bfloat16),
            "f8": torch.tensor([0.5, 1.0], dtype=torch.float8_e4m3fn),
            "c128": torch.tensor([1 + 2j], dtype=torch.complex128),
            "bool": torch.tensor([True, False]),
            "scalar": torch.tensor(7, dtype=torch.int64),
            "empty": torch.zeros(0, 2, dtype=torch.int8),
        },
        "python": (
            1,
            2.5,
            True,
            None,
            "s",
            float("inf"),
            float("nan"),
            torch.float16,
            torch.device("cpu"),
            torch.Size([2, 3]),
        ),
        "numpy": [np.arange(3, dtype=np.int16), np.float32(0.25)],
    }


def test_golden_bytes_are_stable(tmp_path):
    if knobs.HEADER_ALIGN != 64:
        pytest.skip("golden file assumes the default TORCHKEEP_HEADER_ALIGN=64")
    out = tmp_path / "again.tk"
    torchkeep.save(golden_object(), out)
    assert out.read_bytes() == BASIC.read_bytes(), (
        "the encoding changed: bump FORMAT_VERSION, keep reading v1, add a new golden file"
    )


@pytest.mark.parametrize("version", VERSIONS)
def test_golden_file_still_loads(version):
    path = GOLDEN / f"v{version}_basic.tk"
    out = torchkeep.load(path)
    assert_same(golden_object(), out)
    assert out["tied"].data_ptr() == out["model_state"]["fc.weight"].data_ptr()
    assert out["row"].untyped_storage().data_ptr() == out["tied"].untyped_storage().data_ptr()
    assert torchkeep.verify(path) == []


def test_golden_header_layout():
    blob = BASIC.read_bytes()
    length = int.from_bytes(blob[:8], "little")
    assert (8 + length) % 64 == 0  # data section starts aligned
    with torchkeep.open_file(BASIC) as reader:
        meta = reader.metadata
        assert meta[header.META_VERSION] == header.FORMAT_VERSION and meta["format"] == "pt"
        assert set(meta) == {
            "format",
            header.META_VERSION,
            header.META_TREE,
            header.META_CHECKSUMS,
            header.META_HEADER_SUM,
        }


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_broken_golden_copies_keep_failing(name):
    with pytest.raises(BROKEN[name]):
        torchkeep.load(GOLDEN / name)


def _regenerate() -> None:
    GOLDEN.mkdir(exist_ok=True)
    torchkeep.save(golden_object(), BASIC)
    blob = bytearray(BASIC.read_bytes())
    flipped = bytearray(blob)
    flipped[-20] ^= 0x01  # inside the last tensor's data
    version = f"v{header.FORMAT_VERSION}"
    (GOLDEN / f"{version}_basic_data_bitflip.tk").write_bytes(flipped)
    tampered = bytes(blob).replace(b'\\"lr\\":0.1', b'\\"lr\\":0.9', 1)
    assert tampered != bytes(blob)
    (GOLDEN / f"{version}_basic_header_tampered.tk").write_bytes(tampered)
    (GOLDEN / f"{version}_basic_truncated.tk").write_bytes(bytes(blob[:-7]))


if __name__ == "__main__":
    _regenerate()
