"""Hostile and broken inputs through every CLI command: refused, nothing executed, one line."""

from __future__ import annotations

import os

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import LONG
from interop_files import files
from torchkeep.cli.main import cli

HOSTILE = ["evil.pt", "evil_legacy.pt", "bad_header.safetensors", "bad_offsets.safetensors",
           "evil_dcp", "garbage"]  # fmt: skip


@pytest.fixture(scope="module")
def fx(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return files(tmp_path_factory)


def _commands(path: str, tmp: str) -> list[list[str]]:
    return [
        ["inspect", path],
        ["inspect", path, "--json"],
        ["diff", path, path],
        ["convert", path, os.path.join(tmp, "out.safetensors")],
        ["verify", path],
        ["scan", path],
    ]


@pytest.mark.parametrize("name", HOSTILE)
def test_every_command_refuses_without_running_code(fx: dict, name: str, tmp_path) -> None:
    runner = CliRunner()
    for args in _commands(fx[name], str(tmp_path)):
        result = runner.invoke(cli, args)
        assert result.exit_code != 0, (args, result.output)
        assert not os.path.exists(fx["marker"]), f"{args} executed the pickle"
        assert "Traceback" not in result.output
        if result.exit_code in (3, 4):  # expected error: exactly one line saying what to do
            lines = [ln for ln in result.output.splitlines() if ln.strip()]
            assert len(lines) == 1 and lines[0].startswith("error: "), (args, result.output)
    assert not os.path.exists(os.path.join(tmp_path, "out.safetensors"))


def test_refused_pickle_exit_code_and_hint(fx: dict) -> None:
    result = CliRunner().invoke(cli, ["inspect", fx["evil.pt"]])
    assert result.exit_code == 4
    assert "posix.system" in result.output or "os.system" in result.output
    assert "--trusted" in result.output


def test_scan_names_the_dangerous_global(fx: dict) -> None:
    result = CliRunner().invoke(cli, ["scan", fx["evil.pt"], "--json"])
    assert result.exit_code == 1
    assert '"verdict": "unsafe"' in result.output
    assert "system" in result.output


def test_hostile_dcp_metadata_refused(fx: dict) -> None:
    result = CliRunner().invoke(cli, ["inspect", fx["evil_dcp"]])
    assert result.exit_code == 4 and "nothing was executed" in result.output
    assert not os.path.exists(fx["marker"])


def test_missing_path_one_line(tmp_path) -> None:
    result = CliRunner().invoke(cli, ["inspect", str(tmp_path / "nope.pt")])
    assert result.exit_code == 3
    assert result.output.strip().count("\n") == 0 and "no such file" in result.output


def test_debug_variable_shows_traceback(fx: dict) -> None:
    result = CliRunner(env={"TORCHKEEP_DEBUG": "1"}).invoke(cli, ["inspect", fx["garbage"]])
    assert result.exit_code != 0
    assert result.exception is not None and type(result.exception).__name__ == "FormatError"


@pytest.mark.parametrize("command", ["ls", "prune"])
def test_run_dir_commands_refuse_files(fx: dict, command: str) -> None:
    args = [command, fx["evil.pt"]] + (["--keep-last", "1"] if command == "prune" else [])
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 3 and "run directory" in result.output
    assert os.path.exists(fx["evil.pt"]) and not os.path.exists(fx["marker"])


def test_scan_finds_hostile_item_inside_dcp_data(tmp_path) -> None:
    from interop_files import Evil
    from test_readers_dcp import write_dcp

    marker = tmp_path / "marker"
    write_dcp(str(tmp_path / "d"), extra=Evil(str(marker)))
    result = CliRunner().invoke(cli, ["scan", str(tmp_path / "d"), "--json"])
    assert result.exit_code == 1 and "system" in result.output
    for args in (["inspect", str(tmp_path / "d")], ["verify", str(tmp_path / "d")]):
        assert CliRunner().invoke(cli, args).exit_code in (1, 4)
    assert not marker.exists()


@settings(max_examples=60 if not LONG else 2000, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])  # fmt: skip
@given(
    prefix=st.sampled_from([b"", b"PK\x03\x04", b"\x80\x02", b"\x10\x00\x00\x00\x00\x00\x00\x00{"]),
    body=st.binary(max_size=300),
)
def test_random_bytes_never_escape_as_other_errors(tmp_path, prefix: bytes, body: bytes) -> None:
    from torchkeep.errors import TorchkeepError
    from torchkeep.readers.open import open_view

    path = tmp_path / "fuzz.bin"
    path.write_bytes(prefix + body)
    try:
        with open_view(path) as view:
            view.check()
    except TorchkeepError:
        pass
