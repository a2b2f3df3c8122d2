"""File-derived text never reaches the terminal as escape sequences or rich markup (issue 18, 7).

Tensor names, metadata values, metric names, pickle globals and file names carry terminal
escapes (clear screen, window title, hyperlinks), bidi overrides and rich markup. Every command
must print them as visible text, in plain and in forced-colour (terminal) mode, and ``--json``
must stay valid JSON holding the original strings.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

import torchkeep
from torchkeep.cli.main import cli
from torchkeep.cli.safe_text import TerminalGuard, markup_safe, sanitize, visible

EVIL = [
    "\x1b[2J\x1b[H",  # clear screen, cursor home
    "\x1b]0;pwned\x07",  # window title
    "\x1b]8;;http://evil.example\x1b\\click\x1b]8;;\x1b\\",  # OSC 8 hyperlink
    "\x9b31m",  # C1 CSI
    "abc\u202edcba",  # right-to-left override
    "[link=http://evil.example]click[/link]",  # rich markup
    "[/][bold red]x",  # unbalanced markup
    "\r\x08\x08overwrite",  # carriage return and backspaces
]
_ALLOWED_ESC = re.compile(r"\x1b\[[0-9;]*m")


def _assert_clean(text: str) -> None:
    """Only rich's own colour codes may remain; no other control or hidden character."""
    rest = _ALLOWED_ESC.sub("", text)
    bad = [ch for ch in rest if ch not in "\n\t" and not ch.isprintable()]
    assert not bad, f"raw control characters reached the terminal: {bad!r} in {text!r}"
    assert "pwned" not in rest or "\\x1b]0;pwned" in rest


@pytest.fixture(scope="module")
def evil_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("evil")
    tensors = {f"w{i}{name}": torch.full((2,), float(i)) for i, name in enumerate(EVIL)}
    tk = root / "names.tk"
    torchkeep.save({**tensors, **{f"v{i}": name for i, name in enumerate(EVIL)}}, tk)
    other = root / "other.tk"
    torchkeep.save({k: v + 1 for k, v in tensors.items()}, other)
    pt = root / "names.pt"
    torch.save(tensors, pt)
    st = root / "meta.safetensors"
    save_file({"x": torch.zeros(2)}, str(st), metadata={f"k{i}": n for i, n in enumerate(EVIL)})
    pk = root / "globals.pkl"
    pk.write_bytes(b"".join(_global_pickle(name) for name in EVIL[:3]))
    run = root / "run"
    with torchkeep.CheckpointManager(run) as mgr:
        mgr.save(1, {"n": 1}, metrics={name: 0.5 for name in EVIL})
    return {"tk": str(tk), "other": str(other), "pt": str(pt), "st": str(st), "pk": str(pk),
            "run": str(run)}  # fmt: skip


def _global_pickle(module: str) -> bytes:
    """A protocol-0 pickle whose GLOBAL names a module full of escapes (never executed)."""
    return b"c" + module.replace("\n", "").encode("latin-1", "replace") + b"\nname\n."


def _commands(fx: dict[str, str], tmp) -> list[list[str]]:
    return [
        ["inspect", fx["tk"]],
        ["inspect", fx["pt"]],
        ["inspect", fx["st"]],
        ["inspect", fx["run"]],
        ["diff", fx["tk"], fx["other"]],
        ["verify", fx["tk"]],
        ["verify", fx["run"]],
        ["scan", fx["pk"]],
        ["scan", fx["pt"]],
        ["ls", fx["run"]],
        ["convert", fx["tk"], str(tmp / "out.safetensors")],
        ["inspect", fx["tk"] + "\x1b]0;missing\x07"],  # the error line names the path
    ]


@pytest.mark.parametrize("force_color", [False, True], ids=["plain", "terminal"])
def test_every_command_prints_file_text_visibly(evil_files, tmp_path, force_color, monkeypatch):
    if force_color:
        monkeypatch.setenv("FORCE_COLOR", "1")
        monkeypatch.setenv("TERM", "xterm-256color")
    runner = CliRunner()
    for args in _commands(evil_files, tmp_path):
        result = runner.invoke(cli, args)
        assert "Traceback" not in result.output, (args, result.output)
        _assert_clean(result.output)


def test_json_output_keeps_the_original_strings(evil_files) -> None:
    result = CliRunner().invoke(cli, ["inspect", evil_files["tk"], "--json"])
    assert result.exit_code == 0
    assert "\x1b" not in result.output  # json.dumps escapes control characters
    names = {row["name"] for row in json.loads(result.output)["tensors"]}
    assert {f"w{i}{name}" for i, name in enumerate(EVIL)} <= names


def test_markup_is_printed_literally(evil_files) -> None:
    result = CliRunner().invoke(cli, ["inspect", evil_files["tk"]])
    assert "[link=http://evil.example]click[/link]" in result.output


@pytest.mark.parametrize("text", EVIL)
def test_visible_leaves_no_hidden_character(text: str) -> None:
    shown = visible(text)
    assert all(ch.isprintable() for ch in shown)
    assert markup_safe("[b]x[/b]") == "\\[b]x\\[/b]"


def test_sanitize_walks_keys_and_nested_values() -> None:
    data = {"\x1bk": ["\x07", ("[x]", 3)], "n": 1.5}
    assert sanitize(data) == {"\\x1bk": ["\\x07", ("\\[x]", 3)], "n": 1.5}


def test_guard_passes_colours_and_escapes_the_rest() -> None:
    class Sink:
        def __init__(self) -> None:
            self.text = ""

        def write(self, s: str) -> int:
            self.text += s
            return len(s)

    sink = Sink()
    TerminalGuard(sink).write("\x1b[31mred\x1b[0m \x1b]0;t\x07 \x1b[2J")
    assert sink.text == "\x1b[31mred\x1b[0m \\x1b]0;t\\x07 \\x1b[2J"
