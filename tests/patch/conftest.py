"""Fixtures for the fast-path tests."""

from __future__ import annotations

import pytest
from fast_helpers import load_peft


@pytest.fixture
def peft_model_factory(tiny_model_dir):
    def make(family: str = "llama", **kwargs):
        return load_peft(tiny_model_dir(family), **kwargs)

    return make


@pytest.fixture(autouse=True)
def _eager_kernels_one_thread(eager_kernels_one_thread):
    """tests/conftest.py's ``eager_kernels_one_thread`` for every test here (short runs: uncompiled, one thread)."""
    yield
