"""Fixtures of the fasttune.trl tests: one thread and the uncompiled CPU kernels (these runs are tiny)."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _eager_kernels_one_thread(eager_kernels_one_thread):
    """tests/conftest.py's ``eager_kernels_one_thread`` for every test here (short runs: uncompiled, one thread)."""
    yield


@pytest.fixture
def fasttune_logs(caplog):
    """The messages the 'fasttune' logger emitted during the test (compat notes are once per process: reset)."""
    from fasttune import notes

    notes._noted.clear()
    caplog.set_level("INFO", logger="fasttune")
    return lambda: [r.getMessage() for r in caplog.records if r.name == "fasttune"]
