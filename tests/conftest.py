"""Shared pytest fixtures."""

from __future__ import annotations

import os

import pytest

LONG = os.environ.get("TORCHKEEP_LONG") == "1"


@pytest.fixture
def long_run() -> bool:
    """True under ``make test-long``: tests scale their trial counts up."""
    return LONG
