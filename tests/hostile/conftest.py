"""Report how many hostile payloads went through how many guarded entry points."""

from __future__ import annotations

from guard import TALLY


def pytest_terminal_summary(terminalreporter) -> None:  # noqa: ANN001 - pytest hook
    if not TALLY:
        return
    cases = sum(c for _, c, _ in TALLY)
    calls = sum(n for _, _, n in TALLY)
    terminalreporter.write_line(
        f"hostile harness: {cases} payload cases x their entry points = {calls} guarded calls "
        f"(audit hook, memory cap, time bound, sentinel) in {len(TALLY)} runs"
    )
