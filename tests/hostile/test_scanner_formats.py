"""Issue 18 finding 2, by format: real Accelerate, Lightning and DCP checkpoints (the interop
fixtures) with one pickle swapped for a scanner-fooling payload are reported unsafe by
`torchkeep scan` with the global named, and refused by `load`; the stock ones scan safe.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import zipfile

import pytest
import scan_variants as sv
from click.testing import CliRunner

import torchkeep
from torchkeep.cli.main import cli
from torchkeep.errors import TorchkeepError, UnsafeFileError

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from interop_files import files  # noqa: E402


@pytest.fixture(scope="module")
def fx(tmp_path_factory) -> dict[str, str]:
    return files(tmp_path_factory)


def _scan(path: str) -> tuple[int, dict]:
    out = CliRunner().invoke(cli, ["scan", path, "--json"])
    return out.exit_code, json.loads(out.output)


def _swap_zip_pickle(src: str, dst: str, pkl: bytes) -> None:
    with zipfile.ZipFile(src) as old, zipfile.ZipFile(dst, "w") as new:
        for info in old.infolist():
            data = pkl if info.filename.endswith("/data.pkl") else old.read(info)
            new.writestr(info.filename, data)


def test_stock_lightning_and_dcp_scan_safe(fx) -> None:
    for name in ("lightning", "dcp", "zip.pt", "legacy.pt"):
        code, result = _scan(fx[name])
        assert code == 0 and result["verdict"] == "safe", (name, result["unsafe"])


@pytest.mark.parametrize("variant", ["memo_non_strings", "pop_mark_decoys", "proto0"])
def test_accelerate_folder_with_a_tricked_pickle(fx, tmp_path, variant: str) -> None:
    folder = tmp_path / "acc"
    shutil.copytree(fx["acc"], folder)
    marker = tmp_path / "ran"
    payloads = {**sv.trick_variants(f"touch {marker}"), **sv.protocol_variants(f"touch {marker}")}
    (folder / "random_states_0.pkl").write_bytes(payloads[variant])
    code, result = _scan(str(folder))
    assert code == 1 and {"os.system", "posix.system"} & set(result["unsafe"]), result["unsafe"]
    try:
        torchkeep.load(str(folder))
    except TorchkeepError:
        pass  # refused or skipped with a note; either way nothing ran
    assert not marker.exists()


def test_lightning_ckpt_with_a_tricked_pickle(fx, tmp_path) -> None:
    marker = tmp_path / "ran"
    bad = str(tmp_path / "bad.ckpt")
    _swap_zip_pickle(fx["lightning"], bad, sv.trick_variants(f"touch {marker}")["dup_tricks"])
    code, result = _scan(bad)
    assert code == 1 and "os.system" in result["unsafe"]
    with pytest.raises(UnsafeFileError, match="os.system"):
        torchkeep.load(bad)
    assert not marker.exists()


def test_dcp_metadata_with_a_tricked_pickle(fx, tmp_path) -> None:
    folder = tmp_path / "dcp"
    shutil.copytree(fx["dcp"], folder)
    marker = tmp_path / "ran"
    (folder / ".metadata").write_bytes(sv.trick_variants(f"touch {marker}")["memo_operands"])
    code, result = _scan(str(folder))
    assert code == 1 and "os.system" in result["unsafe"]
    with pytest.raises(UnsafeFileError, match="os.system"):
        torchkeep.load(str(folder))
    assert not marker.exists()
