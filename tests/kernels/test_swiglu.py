"""SwiGLU / GeGLU (tanh and exact) parity: fast torch path and Triton kernel against the reference."""

from __future__ import annotations

import pytest
import torch
from kernel_testing import FP32, assert_all_close, assert_bf16_parity, forward_backward, leaf, saved_bytes
from triton_cases import CASES

from fasttune.kernels import geglu, swiglu, use_backend
from fasttune.kernels.reference import geglu_ref, swiglu_ref

NAMES = ("h", "dgate", "dup")
OPS = {
    "swiglu": (swiglu, swiglu_ref),
    "geglu_tanh": (lambda g, u: geglu(g, u, "tanh"), lambda g, u: geglu_ref(g, u, "tanh")),
    "geglu_exact": (lambda g, u: geglu(g, u, "none"), lambda g, u: geglu_ref(g, u, "none")),
}


def _inputs(shape, dtype=torch.float32, scale=3.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen) * scale).to(dtype), torch.randn(shape, generator=gen).to(dtype)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("shape", [(4, 16, 688), (5, 123, 123), (1, 1, 7)])
def test_torch_path_fp32(op, shape):
    fast, ref = OPS[op]
    gate, up = _inputs(shape)
    out, grads = forward_backward(fast, [gate, up], [True, True], "torch")
    ref_out, ref_grads = forward_backward(ref, [gate, up], [True, True], "reference")
    assert_all_close(out + grads, ref_out + ref_grads, FP32, NAMES)


@pytest.mark.parametrize("op", OPS)
def test_torch_path_bf16(op):
    # within BF16 (2e-2) of the fp32 reference, and no less accurate than the bf16 reference
    fast, ref = OPS[op]
    assert_bf16_parity(fast, ref, list(_inputs((5, 123, 123), torch.bfloat16)), [True, True], "torch", NAMES)


@pytest.mark.parametrize("op", OPS)
def test_extreme_gates_stay_finite(op):
    fast, ref = OPS[op]
    gate = torch.tensor([-1e4, -90.0, -30.0, -5.0, 0.0, 5.0, 30.0, 90.0, 1e4]).repeat(2, 1)
    up = torch.ones_like(gate)
    out, grads = forward_backward(fast, [gate, up], [True, True], "torch")
    ref_out, ref_grads = forward_backward(ref, [gate, up], [True, True], "reference")
    assert all(torch.isfinite(t).all() for t in out + grads)
    assert_all_close(out + grads, ref_out + ref_grads, FP32, NAMES)


def test_only_the_needed_input_gets_a_gradient():
    gate, up = _inputs((3, 50))
    out, grads = forward_backward(swiglu, [gate, up], [True, False], "torch")
    ref_out, ref_grads = forward_backward(swiglu_ref, [gate, up], [True, False], "reference")
    assert grads[1] is None
    assert_all_close(out + grads, ref_out + ref_grads, FP32, NAMES)


@pytest.mark.parametrize("op", OPS)
def test_saves_gate_and_up_only(op):
    fast, ref = OPS[op]
    gate, up = (leaf(t) for t in _inputs((4, 256, 688), torch.bfloat16))
    with use_backend("torch"):
        assert saved_bytes(lambda: fast(gate, up), exclude=[gate, up]) == 0  # nothing beyond its inputs
    assert saved_bytes(lambda: ref(gate, up), exclude=[gate, up]) >= gate.nbytes  # act(gate), a third tensor


def test_rejects_bad_arguments():
    gate, up = _inputs((2, 8))
    with pytest.raises(ValueError, match="approximate='erf'"):
        geglu(gate, up, "erf")
    with pytest.raises(ValueError, match="same shape"):
        swiglu(gate, up[:, :7])


@pytest.mark.parametrize("case", [name for name in CASES if name.startswith("glu/")])
def test_triton_interpreter(triton_results, case):
    assert triton_results[case] == "ok", triton_results[case]
