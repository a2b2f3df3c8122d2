"""Make text from files harmless on a terminal.

Names, metric keys and metadata come from files someone else may have written. On the way to
the terminal they could carry escape sequences (clear the screen, set the window title, write
hyperlinks) or rich markup (``[link=...]``, ``[/]``). Two layers stop them:

1. :func:`sanitize` turns every string of a command's result into printable text before it is
   formatted: control characters and invisible direction overrides become ``\\xNN``/``\\uNNNN``
   escapes, and rich markup is escaped so brackets print as brackets.
2. :class:`TerminalGuard` wraps the stream rich writes to and lets through only the colour
   codes (SGR) rich itself emits; any other control character that still arrives is shown
   escaped. JSON output needs neither: ``json.dumps`` escapes control characters itself.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Any, TextIO

from rich.markup import escape as escape_markup

# C0 and C1 controls except newline and tab, DEL, and the Unicode format characters that
# reorder or hide text (bidi overrides and isolates, zero-width joiners are Cf as well).
_KEEP = {"\n", "\t"}
_SGR = re.compile(r"\x1b\[[0-9;]*m")


def _is_hidden(ch: str) -> bool:
    return ch not in _KEEP and unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Co", "Cn")


def _show(ch: str) -> str:
    code = ord(ch)
    return (
        f"\\x{code:02x}"
        if code < 0x100
        else f"\\u{code:04x}"
        if code < 0x10000
        else (f"\\U{code:08x}")
    )


def visible(text: str) -> str:
    """``text`` with every control or invisible formatting character written as an escape."""
    if text.isprintable():
        return text
    return "".join(_show(ch) if _is_hidden(ch) else ch for ch in text)


def markup_safe(text: str) -> str:
    """``text`` ready to be embedded in rich markup: visible, brackets escaped."""
    return escape_markup(visible(text))


def one_line_safe(text: str) -> str:
    """``text`` for a plain (non-rich) line: visible, whitespace runs collapsed."""
    return visible(" ".join(text.split()))


def sanitize(obj: Any) -> Any:
    """A copy of ``obj`` with every string (dict keys too) made :func:`markup_safe`."""
    if isinstance(obj, str):
        return markup_safe(obj)
    if isinstance(obj, dict):
        return {sanitize(k): sanitize(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return (
            type(obj)(sanitize(v) for v in obj)
            if isinstance(obj, list)
            else tuple(sanitize(v) for v in obj)
        )
    return obj


class TerminalGuard:
    """A text stream wrapper that passes rich's colour codes and escapes every other control."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        if not text.isprintable():
            text = _guard(text)
        return self._stream.write(text)

    def __getattr__(self, name: str) -> Any:  # isatty, fileno, flush, encoding...
        return getattr(self._stream, name)


def _guard(text: str) -> str:
    parts: list[str] = []
    last = 0
    for match in _SGR.finditer(text):
        parts.append(visible(text[last : match.start()]))
        parts.append(match.group())
        last = match.end()
    parts.append(visible(text[last:]))
    return "".join(parts)
