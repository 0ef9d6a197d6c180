"""Kernel test fixtures. Triton kernels are checked on CPU by Triton's interpreter in one child process.

``TRITON_INTERPRET=1`` only takes effect when set before ``triton`` is first imported (triton's own library
functions are decorated at import), and the test session has imported triton already (transformers does), so the
interpreter cases in ``triton_cases.py`` run in a child process started with it set; each op's test file asserts
its own cases' results. ``torch.compile`` of the CPU path is off in these tests except in test_compiled.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fasttune.kernels import triton_available
from fasttune.kernels.compiling import use_compile

HERE = Path(__file__).parent


@pytest.fixture(autouse=True)
def _uncompiled():
    """Kernel tests check the plain torch path; test_compiled.py turns compiling on where it tests it."""
    with use_compile(False):
        yield


@pytest.fixture(scope="session")
def triton_results() -> dict[str, str]:
    """``{case name: "ok" or the failure text}`` for every case of ``triton_cases.py``, run once per session."""
    if not triton_available():
        pytest.skip("triton is not installed (pip install triton)")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(HERE))
    proc = subprocess.run([sys.executable, str(HERE / "triton_cases.py")], capture_output=True, text=True, env=env,
                          timeout=600, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"triton_cases.py failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
