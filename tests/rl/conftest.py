"""Fixtures of the RL tests: one thread and the uncompiled CPU kernels (these runs are tiny)."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _eager_kernels_one_thread(eager_kernels_one_thread):
    """tests/conftest.py's ``eager_kernels_one_thread`` for every test here (short runs: uncompiled, one thread)."""
    yield
