"""The CUDA side of the suite: one marker (``cuda``) and the device the CUDA cases run on.

Every test that needs CUDA carries ``@pytest.mark.cuda``: the CUDA twins of the CPU tests live in ``*_cuda.py`` files
beside them and reuse their cases and helpers, so the CPU cases stay exactly as they were. ``tests/conftest.py``
skips the marked cases, with the reason, where ``torch.cuda.is_available()`` is False, so on a CPU machine pytest
lists them as skipped instead of leaving them out; ``scripts/device_check.sh`` runs exactly them (``pytest -m cuda``).

``FASTTUNE_CUDA_TESTS_ON=cpu`` runs the CUDA cases on the CPU instead (a dry run of their logic on a machine without a
GPU: it finds mistakes in the tests, not in the CUDA path; Triton cases then need ``TRITON_INTERPRET=1`` set before
pytest starts and run in fp32 only, since the interpreter's bf16 arithmetic is wrong).
"""

from __future__ import annotations

import os

import torch

_ENV = "FASTTUNE_CUDA_TESTS_ON"
CUDA = os.environ.get(_ENV, "cuda")
if CUDA not in ("cuda", "cpu"):
    raise ValueError(f"{_ENV}: {CUDA!r} is not a device for the CUDA cases; allowed values are 'cuda' and 'cpu'")
DRY_RUN = CUDA == "cpu"
SKIP_REASON = ("needs CUDA: torch.cuda.is_available() is False here "
               "(bash scripts/device_check.sh runs these cases on a GPU)")


def cuda_runs() -> bool:
    """Whether the ``cuda`` cases run in this session (a GPU is present, or the CPU dry run was asked for)."""
    return DRY_RUN or torch.cuda.is_available()


def device(name: str = "cuda") -> torch.device:
    """The torch device a case parametrized with ``name`` runs on (``"cuda"`` is the CPU in the dry run)."""
    return torch.device(CUDA if name == "cuda" else name)


def bf16_runs_in_triton() -> bool:
    """bf16 Triton cases run compiled on a GPU; the interpreter of the dry run computes bf16 wrongly."""
    return not DRY_RUN
