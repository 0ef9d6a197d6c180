"""Fixtures of the fasttune.trl tests: one thread and the uncompiled CPU kernels (these runs are tiny)."""

from __future__ import annotations

import pytest
import torch

from fasttune.kernels.compiling import use_compile


@pytest.fixture(autouse=True)
def _eager_kernels_one_thread():
    """torch.compile's first-call cost would dominate these short runs (tests/kernels checks the compiled path); one
    thread because the machine is shared and these matmuls gain nothing from more."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with use_compile(False):
            yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def fasttune_logs(caplog):
    """The messages the 'fasttune' logger emitted during the test (compat notes are once per process: reset)."""
    from fasttune import notes

    notes._noted.clear()
    caplog.set_level("INFO", logger="fasttune")
    return lambda: [r.getMessage() for r in caplog.records if r.name == "fasttune"]
