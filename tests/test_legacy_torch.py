"""Reading torch.save files safely: weights_only by default, refusal of code, opt-in trust."""

from __future__ import annotations

import collections
import os
import pickle
import zipfile

import pytest
import torch

import torchkeep
from _compare import assert_same
from torchkeep import UnsafeFileError


class Harmless:
    """A custom class: not on the weights-only allow-list, but safe to build."""

    def __init__(self, value: int) -> None:
        self.value = value


class RunsShell:
    """Unpickling this calls ``os.system`` (the classic pickle exploit)."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def checkpoint() -> dict:
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 1)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(3, 6)).sum().backward()
    opt.step()
    return {"epoch": 90, "model_state": model.state_dict(), "optim_state": opt.state_dict()}


FORMATS = pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])


@FORMATS
@pytest.mark.parametrize("mmap", [False, True], ids=["read", "mmap"])
def test_torch_save_files_load_through_weights_only(tmp_path, zip_format, mmap):
    obj = checkpoint()
    path = tmp_path / "ckpt.pt"
    torch.save(obj, path, _use_new_zipfile_serialization=zip_format)
    assert_same(obj, torchkeep.load(path, mmap=mmap))


@FORMATS
def test_plain_state_dict_and_map_location(tmp_path, zip_format):
    sd = collections.OrderedDict(w=torch.randn(3), b=torch.arange(2))
    path = tmp_path / "sd.pt"
    torch.save(sd, path, _use_new_zipfile_serialization=zip_format)
    out = torchkeep.load(path, map_location="cpu")
    assert list(out) == ["w", "b"] and torch.equal(out["w"], sd["w"])
    model = torch.nn.Linear(3, 1)
    torch.save(model.state_dict(), path, _use_new_zipfile_serialization=zip_format)
    assert torchkeep.load_state_dict(torch.nn.Linear(3, 1), path).ok


def _assert_refused_without_running(path, sentinel):
    with pytest.raises(UnsafeFileError) as info:
        torchkeep.load(path)
    assert not sentinel.exists(), "the pickle's payload ran"
    assert {"posix.system", "os.system"} & set(info.value.globals), info.value.globals
    assert "trusted=True" in str(info.value) and str(path) in str(info.value)
    with pytest.raises(UnsafeFileError):
        torchkeep.load_state_dict(torch.nn.Linear(1, 1), path)
    assert not sentinel.exists()


@FORMATS
def test_os_system_pickle_refused(tmp_path, zip_format):
    sentinel = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    payload = {"weights": torch.ones(2), "x": RunsShell(f"touch {sentinel}")}
    torch.save(payload, path, _use_new_zipfile_serialization=zip_format)
    _assert_refused_without_running(path, sentinel)


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_raw_pickle_of_any_protocol_refused(tmp_path, protocol):
    sentinel = tmp_path / "pwned"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"x": RunsShell(f"touch {sentinel}")}, protocol=protocol))
    _assert_refused_without_running(path, sentinel)


def test_renamed_archive_folder_still_scanned(tmp_path):
    sentinel = tmp_path / "pwned"
    original = tmp_path / "evil.pt"
    torch.save({"x": RunsShell(f"touch {sentinel}")}, original)
    renamed = tmp_path / "innocent.pt"
    with zipfile.ZipFile(original) as src, zipfile.ZipFile(renamed, "w") as dst:
        for item in src.infolist():
            folder, _, rest = item.filename.partition("/")
            dst.writestr(f"totally_weights/{rest}", src.read(item.filename))
    with zipfile.ZipFile(renamed) as check:
        assert "totally_weights/data.pkl" in check.namelist()
    _assert_refused_without_running(renamed, sentinel)


@FORMATS
def test_trusted_loads_custom_class(tmp_path, zip_format):
    path = tmp_path / "custom.pt"
    torch.save(
        {"obj": Harmless(5), "w": torch.ones(2)}, path, _use_new_zipfile_serialization=zip_format
    )
    with pytest.raises(UnsafeFileError) as info:
        torchkeep.load(path)
    assert any(g.endswith("Harmless") for g in info.value.globals)
    out = torchkeep.load(path, trusted=True)
    assert isinstance(out["obj"], Harmless) and out["obj"].value == 5


def test_allowed_globals_are_not_reported(tmp_path):
    """Refusal lists only what is outside the allow-list (not torch's own rebuild helpers)."""
    path = tmp_path / "custom.pt"
    torch.save({"obj": Harmless(1), "w": torch.ones(2)}, path)
    with pytest.raises(UnsafeFileError) as info:
        torchkeep.load(path)
    assert not any(g.startswith("torch._utils") for g in info.value.globals)


def test_garbage_zip_is_format_error(tmp_path):
    path = tmp_path / "bad.pt"
    path.write_bytes(b"PK\x03\x04" + b"\0" * 100)
    with pytest.raises(torchkeep.FormatError):
        torchkeep.load(path)
