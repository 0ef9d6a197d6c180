"""Fixtures for the fast-path tests."""

from __future__ import annotations

import pytest
import torch
from fast_helpers import load_peft

from fasttune.kernels.compiling import use_compile


@pytest.fixture
def peft_model_factory(tiny_model_dir):
    def make(family: str = "llama", **kwargs):
        return load_peft(tiny_model_dir(family), **kwargs)

    return make


@pytest.fixture(autouse=True)
def _eager_kernels_one_thread():
    """Run fasttune.kernels' CPU path uncompiled here: torch.compile's first-call cost would dominate these short
    runs (the compiled path has its own parity tests in tests/kernels). One thread: these tiny matmuls gain nothing
    from more, and on a shared machine extra threads only wait for each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with use_compile(False):
            yield
    finally:
        torch.set_num_threads(threads)
