"""FP8 weights on a GPU (``pytest -m cuda``; skipped with the reason without one): the exact dequantize-and-multiply
path on CUDA, and the CUDA-only ``torch._scaled_mm`` path (``FASTTUNE_FP8_SCALED_MM=1``: activations rounded to e4m3
per token, row-wise weight scales) within the error that rounding allows."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from cuda_testing import DRY_RUN, device

import fasttune.quant.fp8 as fp8
from fasttune.quant import FP8Linear, dequantize_weight

pytestmark = pytest.mark.cuda
DEV = device()


def test_fp8_linear_on_gpu_equals_the_dequantized_reference():
    gen = torch.Generator().manual_seed(1)
    layer = FP8Linear.from_linear(torch.nn.Linear(192, 160, bias=True), "block", torch.float32).to(DEV)
    assert layer.weight.device.type == DEV.type and layer.weight.dtype == torch.float8_e4m3fn
    ref_w = layer.dequantized(torch.float32)
    x = torch.randn(5, 7, 192, generator=gen).to(DEV).requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    y = layer(x)
    y_ref = F.linear(x_ref, ref_w, layer.bias)
    assert torch.equal(y, y_ref)
    grad = torch.randn(y.shape, generator=gen).to(DEV)
    y.backward(grad)
    y_ref.backward(grad)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-6, atol=1e-6)
    assert torch.equal(dequantize_weight(layer), ref_w)


def test_scaled_mm_path_is_within_e4m3_activation_rounding(monkeypatch):
    if DRY_RUN:
        pytest.skip("torch._scaled_mm needs a CUDA GPU with FP8 (dry run on CPU)")
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip(f"FP8 matrix products need compute capability 8.9+; this GPU is {torch.cuda.get_device_capability()}")
    monkeypatch.setenv("FASTTUNE_FP8_SCALED_MM", "1")
    calls = []
    real = fp8._scaled_mm_forward
    monkeypatch.setattr(fp8, "_scaled_mm_forward", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    gen = torch.Generator().manual_seed(2)
    layer = FP8Linear.from_linear(torch.nn.Linear(256, 192, bias=True), "row", torch.bfloat16).to(DEV)
    x = (torch.randn(3, 11, 256, generator=gen) * 2).to(torch.bfloat16).to(DEV)
    with torch.no_grad():
        y = layer(x)
    assert calls == [1] and y.dtype == torch.bfloat16 and y.shape == (3, 11, 192)
    w = layer.dequantized(torch.float32)
    bias = layer.bias.to(torch.bfloat16).float()  # the path adds the bias in the activations' dtype
    xf = x.float().reshape(-1, 256)
    exact = xf @ w.T + bias
    # each activation is rounded to e4m3 with its token's scale (max -> 448): relative error <= 2^-4 for normal
    # values, absolute <= 2^-9 x scale below; the output is rounded to bf16 (2^-8 relative)
    scale = xf.abs().amax(1, keepdim=True) / 448
    bound = (2**-4 * xf.abs() + 2**-9 * scale) @ w.abs().T + 2**-8 * exact.abs() + 1e-6
    err = (y.float().reshape(-1, 192) - exact).abs()
    assert (err <= bound).all(), f"worst excess {(err - bound).max():.3e} (error {err.max():.3e})"
