"""RMSNorm parity: fast torch path and Triton kernels against the reference (output, dx, dw)."""

from __future__ import annotations

import importlib

import pytest
import torch
from kernel_testing import (
    FP32,
    assert_all_close,
    assert_bf16_parity,
    forward_backward,
    leaf,
    saved_bytes,
)
from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm
from triton_cases import CASES

from fasttune.kernels import rms_norm, use_backend
from fasttune.kernels.reference import rms_norm_ref
from fasttune.kernels.rms_norm import _backward_torch

EPS = 1e-6
SHAPES = [(2, 16, 256), (5, 123, 123), (3, 7, 1000)]
NAMES = ("y", "dx", "dw")


def _inputs(shape, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=gen) * 3 + 0.5).to(dtype)
    w = (torch.randn(shape[-1], generator=gen) * 0.5 + 1).to(dtype)
    return x, w


def _compare(shape, dtype, offset, backend, tol, weight_grad=True):
    x, w = _inputs(shape, dtype)
    op = lambda x, w: rms_norm(x, w, EPS, offset)  # noqa: E731
    ref = lambda x, w: rms_norm_ref(x, w, EPS, offset)  # noqa: E731
    out, grads = forward_backward(op, [x, w], [True, weight_grad], backend)
    ref_out, ref_grads = forward_backward(ref, [x, w], [True, weight_grad], "reference")
    assert_all_close(out + grads, ref_out + ref_grads, tol, NAMES)
    assert out[0].dtype == ref_out[0].dtype


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("offset", [False, True], ids=["x*w", "x*(1+w)"])
def test_torch_path_fp32(shape, offset):
    _compare(shape, torch.float32, offset, "torch", FP32)


@pytest.mark.parametrize("offset", [False, True], ids=["x*w", "x*(1+w)"])
def test_torch_path_bf16(offset):
    # bf16: within BF16 (2e-2) of the fp32 reference, and no less accurate than the bf16 reference.
    x, w = _inputs((5, 123, 123), torch.bfloat16)
    assert_bf16_parity(lambda x, w: rms_norm(x, w, EPS, offset), lambda x, w: rms_norm_ref(x, w, EPS, offset),
                       [x, w], [True, True], "torch", NAMES)


def test_frozen_weight_gets_no_gradient_and_no_dw_work(monkeypatch):
    _compare((4, 9, 123), torch.float32, False, "torch", FP32, weight_grad=False)
    calls = []

    def spy(*args, **kwargs):
        calls.append(args[-1])  # need_dw
        return _backward_torch(*args, **kwargs)

    # the module (fasttune.kernels.rms_norm as an attribute is the function of the same name)
    monkeypatch.setattr(importlib.import_module("fasttune.kernels.rms_norm"), "_backward_torch", spy)
    x, w = _inputs((6, 64), torch.float32)
    with use_backend("torch"):
        rms_norm(leaf(x), w, EPS).sum().backward()  # frozen weight
        rms_norm(leaf(x), leaf(w), EPS).sum().backward()  # trained weight
    assert calls == [False, True]
    rstd = torch.rsqrt(x.square().mean(-1) + EPS)
    dx, dw = _backward_torch(torch.randn_like(x), x, w, rstd, False, True, False)
    assert dx is not None and dw is None


def test_reference_matches_transformers_norms():
    x, w = _inputs((2, 5, 64), torch.bfloat16)
    llama = LlamaRMSNorm(64, eps=EPS).to(torch.bfloat16)
    gemma = Gemma3RMSNorm(64, eps=EPS).to(torch.bfloat16)
    with torch.no_grad():
        llama.weight.copy_(w)
        gemma.weight.copy_(w)
        torch.testing.assert_close(rms_norm_ref(x, w, EPS, False), llama(x), atol=0, rtol=0)
        torch.testing.assert_close(rms_norm_ref(x, w, EPS, True), gemma(x), atol=0, rtol=0)


def test_saves_only_x_and_rstd():
    x, w = _inputs((8, 128, 256), torch.bfloat16)
    xl, wl = leaf(x), leaf(w)
    with use_backend("torch"):
        fast = saved_bytes(lambda: rms_norm(xl, wl, EPS), exclude=[xl, wl])
    ref = saved_bytes(lambda: rms_norm_ref(xl, wl, EPS), exclude=[xl, wl])
    rows = 8 * 128
    assert fast == rows * 4  # rstd only: x and w are inputs
    assert ref >= rows * 256 * (4 + 2)  # an fp32 copy of x and the bf16 normalised x, at least


def test_rejects_mismatched_weight():
    with pytest.raises(ValueError, match="weight shape"):
        rms_norm(torch.randn(2, 8), torch.randn(7), EPS)


@pytest.mark.parametrize("case", [name for name in CASES if name.startswith("rms_norm/")])
def test_triton_interpreter(triton_results, case):
    assert triton_results[case] == "ok", triton_results[case]
