"""Shared pytest fixtures."""

from __future__ import annotations

import os
import sys

import pytest

from torchkeep import knobs

LONG = os.environ.get("TORCHKEEP_LONG") == "1"


@pytest.fixture
def long_run() -> bool:
    """True under ``make test-long``: tests scale their trial counts up."""
    return LONG


@pytest.fixture(params=["buffered", "direct"])
def write_mode(request, monkeypatch) -> str:
    """Run a test with buffered writes, then with direct I/O forced on for these small files
    (4 KiB staging segments, so a save is several aligned writes, a head and a truncation)."""
    if request.param == "direct":
        monkeypatch.setattr(knobs, "DIRECT_MIN_BYTES", 1)
        monkeypatch.setattr(knobs, "DIRECT_CHUNK_BYTES", 4096)
        monkeypatch.setattr(knobs, "SMALL_TENSOR_BYTES", 64)  # so these tensors count
    return request.param


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on 127.0.0.1 (session-wide), with dummy credentials in the environment
    so that URLs without storage_options (CLI, subprocesses) reach it too."""
    pytest.importorskip("s3fs")
    pytest.importorskip("moto.server")
    from s3server import S3Server, apply_env

    server = S3Server()
    apply_env(server)
    yield server
    server.stop()


@pytest.fixture
def s3_run(s3_server) -> str:
    """A fresh bucket's URL prefix: ``s3://<bucket>``."""
    return f"s3://{s3_server.new_bucket()}"


def pytest_terminal_summary(terminalreporter) -> None:  # noqa: ANN001 - pytest hook
    """How many hostile payloads went through how many guarded entry points (tests/hostile)."""
    guard = sys.modules.get("guard")
    tally = getattr(guard, "TALLY", None)
    if not tally:
        return
    cases = sum(c for _, c, _ in tally)
    calls = sum(n for _, _, n in tally)
    terminalreporter.write_line(
        f"hostile harness: {cases} payload cases x their entry points = {calls} guarded calls "
        f"(audit hook, memory cap, time bound, sentinel) in {len(tally)} runs"
    )
