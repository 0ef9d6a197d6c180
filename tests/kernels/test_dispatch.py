"""The backend dispatcher: device-based choice, forcing, errors, and fasttune.kernels without triton."""

from __future__ import annotations

import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

import fasttune.kernels.dispatch as dispatch
from fasttune.kernels import rms_norm, select_backend, swiglu, use_backend

REPO = Path(__file__).resolve().parents[2]


def _on(device: str):
    """Stands in for a tensor on ``device`` (select_backend only reads ``.device``); needs no GPU."""
    return types.SimpleNamespace(device=torch.device(device))


def test_auto_picks_by_device(monkeypatch):
    monkeypatch.delenv("FASTTUNE_KERNEL_BACKEND", raising=False)
    assert select_backend(torch.zeros(1)) == "torch"
    assert select_backend(_on("meta")) == "reference"
    monkeypatch.setattr(dispatch, "triton_available", lambda: True)
    assert select_backend(_on("cuda")) == "triton"
    monkeypatch.setattr(dispatch, "triton_available", lambda: False)
    assert select_backend(_on("cuda")) == "torch"


def test_forcing_by_context_and_environment(monkeypatch):
    monkeypatch.setenv("FASTTUNE_KERNEL_BACKEND", "reference")
    assert select_backend(torch.zeros(1)) == "reference"
    with use_backend("torch"):
        assert select_backend(torch.zeros(1)) == "torch"
        with use_backend("auto"):
            assert select_backend(torch.zeros(1)) == "torch"
    assert select_backend(torch.zeros(1)) == "reference"


def test_reference_backend_runs_the_reference():
    x, w = torch.randn(3, 8, requires_grad=True), torch.randn(8)
    with use_backend("reference"):
        ref_graph = rms_norm(x, w, 1e-6).grad_fn
    with use_backend("torch"):
        fast_graph = rms_norm(x, w, 1e-6).grad_fn
    assert "RMSNormFunction" in type(fast_graph).__name__
    assert "RMSNormFunction" not in type(ref_graph).__name__


def test_bad_names_are_errors(monkeypatch):
    with pytest.raises(ValueError, match="'cuda' is not a kernel backend; allowed values are auto, reference"):
        with use_backend("cuda"):
            pass
    monkeypatch.setenv("FASTTUNE_KERNEL_BACKEND", "fast")
    with pytest.raises(ValueError, match="FASTTUNE_KERNEL_BACKEND: 'fast'"):
        swiglu(torch.randn(2), torch.randn(2))
    monkeypatch.setenv("FASTTUNE_KERNEL_BACKEND", "triton")
    monkeypatch.setattr(dispatch, "triton_available", lambda: False)
    with pytest.raises(RuntimeError, match="triton is not installed"):
        swiglu(torch.randn(2), torch.randn(2))


_WITHOUT_TRITON = """
import sys, types
sys.modules["triton"] = None  # any "import triton" now fails
package = types.ModuleType("fasttune")
package.__path__ = [sys.argv[1] + "/fasttune"]
sys.modules["fasttune"] = package
import torch
import fasttune.kernels as K
assert not K.triton_available()
x = torch.randn(4, 6, 32, requires_grad=True)
w = torch.randn(32, requires_grad=True)
cos, sin = torch.randn(4, 6, 32), torch.randn(4, 6, 32)
q, k = K.apply_rope(x[:, None], x[:, None], cos, sin)
y = K.rms_norm(x, w, 1e-6) + K.swiglu(x, x) + K.geglu(x, x) + q[:, 0] + k[:, 0]
loss = K.fused_linear_cross_entropy(y, torch.randn(50, 32), torch.randint(0, 50, (4, 6)))
loss.backward()
assert x.grad is not None and w.grad is not None
print("ok")
"""


def test_kernels_work_without_triton():
    env = {k: v for k, v in os.environ.items() if k != "FASTTUNE_KERNEL_BACKEND"}
    env["FASTTUNE_COMPILE"] = "0"
    proc = subprocess.run([sys.executable, "-c", _WITHOUT_TRITON, str(REPO)], capture_output=True, text=True,
                          env=env, timeout=120, check=False)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]
