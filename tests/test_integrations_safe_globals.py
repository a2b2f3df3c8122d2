"""The restricted NumPy allow-list (readers/safe_globals.py): RNG states and plain NumPy values
load without trusted=True; anything else NumPy can pickle is refused, and nothing leaks into
torch's own process-wide allow-list."""

from __future__ import annotations

import os
import pickle
import random
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch

import torchkeep
from torchkeep.readers import safe_globals
from torchkeep.readers.open import open_view

_reconstruct = np.ndarray.__reduce__(np.zeros(1))[0]  # numpy's own, under either module name


TOO_BIG = (1, (1 << 30,), np.dtype("u4"), False, b"\0" * 4)  # ndarray state: 4 bytes for 4 GiB
FIELDS = (3, "|", None, ("a",), {"a": (np.dtype("u4"), 0)}, 4, 1, 16)  # dtype state with fields


class Crafted:
    """Pickles as whatever ``reduce`` says: lets a test write hostile NumPy pickles."""

    def __init__(self, reduce: tuple) -> None:
        self.reduce = reduce

    def __reduce__(self) -> tuple:
        return self.reduce


def saved(tmp_path, obj, name: str = "x.pt") -> str:
    path = str(tmp_path / name)
    torch.save(obj, path)
    return path


def test_rng_states_and_plain_numpy_values_round_trip(tmp_path) -> None:
    np.random.seed(11)
    random.seed(12)
    obj = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "cpu": torch.get_rng_state(),
        "scalar": np.float32(2.5),
        "int": np.int64(-3),
        "fortran": np.asfortranarray(np.arange(6.0).reshape(2, 3)),
        "big_endian": np.arange(3, dtype=">i2"),
        "bools": np.array([True, False]),
        "complex": np.array([1 + 2j], dtype=np.complex64),
        "empty": np.zeros((0, 4), dtype=np.uint8),
    }
    back = torchkeep.load(saved(tmp_path, obj))
    assert back["python"] == obj["python"]
    for got, want in zip(back["numpy"], obj["numpy"]):
        assert type(got) is type(want) and np.array_equal(np.asarray(got), np.asarray(want))
    for key in ("scalar", "int"):
        assert type(back[key]) is type(obj[key]) and back[key] == obj[key]
    for key in ("fortran", "big_endian", "bools", "complex", "empty"):
        assert back[key].dtype == obj[key].dtype and np.array_equal(back[key], obj[key]), key
    assert back["fortran"].flags.f_contiguous
    np.random.set_state(back["numpy"])
    expected = np.random.rand()
    np.random.set_state(obj["numpy"])
    assert np.random.rand() == expected


@pytest.mark.parametrize(
    "name, obj",
    [
        ("object array", np.array([1, "a"], dtype=object)),
        ("structured dtype", np.zeros(2, dtype=[("a", "i4"), ("b", "f8")])),
        ("string array", np.array(["abc"])),
        ("masked array subclass", np.ma.masked_array([1, 2], mask=[0, 1])),
        ("datetime", np.array(["2020-01-01"], dtype="datetime64[D]")),
        ("ndarray called directly", Crafted((np.ndarray, ((1 << 40,),)))),
        ("bytes of a size", Crafted((bytes, (1 << 40,)))),
        (
            "shape larger than its bytes",
            Crafted((_reconstruct, (np.ndarray, (0,), b"b"), TOO_BIG)),
        ),
        (
            "subtype not ndarray",
            Crafted((_reconstruct, (np.dtype, (0,), b"b"))),
        ),
        (
            "dtype with fields through its state",
            Crafted((np.dtype, ("u4", False, True), FIELDS)),
        ),
    ],
)  # fmt: skip
def test_everything_else_is_refused(tmp_path, name: str, obj: object) -> None:
    path = saved(tmp_path, {"value": obj})
    with pytest.raises(torchkeep.UnsafeFileError) as info:
        torchkeep.load(path)
    assert path in str(info.value) and "trusted=True" in str(info.value), name
    if name == "object array":  # the reason is the stand-in's, not torch's generic text
        assert "numpy dtype 'O8' is outside the numeric allow-list" in str(info.value)


def test_torch_allow_list_is_left_as_it_was(tmp_path) -> None:
    path = saved(tmp_path, {"numpy": np.random.get_state()})
    before = set(torch.serialization.get_safe_globals())
    torchkeep.load(path)
    assert set(torch.serialization.get_safe_globals()) == before
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)  # the user's own torch.load is not widened


def test_concurrent_loads_keep_the_allow_list_registered(tmp_path) -> None:
    path = saved(tmp_path, {"numpy": np.random.get_state()})
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(20):
                assert torchkeep.load(path)["numpy"][1].dtype == np.uint32
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors[0]
    assert safe_globals._users == 0


def test_scan_lists_the_restricted_names_as_allowed(tmp_path) -> None:
    from torchkeep.readers.pickle_scan import scan_file
    from torchkeep.readers.torch_file import unsafe_globals

    scan = scan_file(saved(tmp_path, {"numpy": np.random.get_state()}))
    assert any("_reconstruct" in g for g in scan.globals) and unsafe_globals(scan) == []


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs symlinks and FIFOs")
def test_folder_symlinks_are_not_followed(tmp_path) -> None:
    outside = saved(tmp_path, {"secret": torch.ones(2)}, "outside.pt")
    folder = tmp_path / "checkpoint-1"
    folder.mkdir()
    (folder / "trainer_state.json").write_text('{"global_step": 1}')
    os.symlink(outside, folder / "optimizer.pt")
    os.mkfifo(folder / "scheduler.pt")  # would block a plain open for ever
    saved(folder, {"cpu": torch.get_rng_state()}, "kept.bin")
    os.symlink(folder / "kept.bin", folder / "rng_state.pth")  # a link that stays inside
    with open_view(folder) as view:
        assert view.format == "hf-trainer" and list(view.refs) == ["rng_state.cpu"]
        assert any("optimizer.pt" in n and "symbolic link" in n for n in view.notes)
        assert any("scheduler.pt" in n and "FIFO" in n for n in view.notes)
        assert view.values["trainer_state.global_step"] == 1
    from click.testing import CliRunner

    from torchkeep.cli.main import cli

    result = CliRunner().invoke(cli, ["scan", str(folder), "--json"])
    assert result.exit_code == 0 and "outside.pt" not in result.output


def test_import_torchkeep_imports_no_framework() -> None:
    code = (
        "import sys, torchkeep, torchkeep.integrations, torchkeep.cli.main\n"
        "import torchkeep.integrations.checkpoint_io\n"
        "heavy = [m for m in ('lightning', 'pytorch_lightning', 'lightning_fabric',\n"
        "                     'transformers', 'accelerate') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "import torchkeep.integrations.accelerate\n"
        "assert 'accelerate' in sys.modules  # the check above can fail\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
