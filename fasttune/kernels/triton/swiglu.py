"""Triton gated activations (SwiGLU, GeGLU tanh/exact): elementwise over flat, contiguous gate/up.

Formulas: see ``fasttune.kernels.swiglu``. All maths in fp32; ``ACT`` is 0 silu, 1 gelu_tanh, 2 gelu (exact).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["gated_backward", "gated_forward"]

_ACT_IDS = {"silu": 0, "gelu_tanh": 1, "gelu": 2}
_BLOCK = 1024


@triton.jit
def _act(g, ACT: tl.constexpr):
    """Returns (act(g), act'(g)) in fp32."""
    if ACT == 0:
        e = tl.exp(-tl.abs(g))
        sig = tl.where(g >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
        a = g * sig
        da = sig * (1.0 + g * (1.0 - sig))
    elif ACT == 1:
        k = 0.7978845608028654
        inner = tl.minimum(tl.maximum(k * g * (1.0 + 0.044715 * g * g), -20.0), 20.0)
        t = 1.0 - 2.0 / (tl.exp(2.0 * inner) + 1.0)
        a = 0.5 * g * (1.0 + t)
        da = 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * k * (1.0 + 3.0 * 0.044715 * g * g)
    else:
        cdf = 0.5 * (1.0 + tl.erf(g * 0.7071067811865476))
        a = g * cdf
        da = cdf + g * tl.exp(-0.5 * g * g) * 0.3989422804014327
    return a, da


@triton.jit
def _gated_fwd(gate_ptr, up_ptr, out_ptr, n, ACT: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(gate_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    a, _ = _act(g, ACT)
    tl.store(out_ptr + offs, (a * u).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gated_bwd(dy_ptr, gate_ptr, up_ptr, dgate_ptr, dup_ptr, n, ACT: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(gate_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    a, da = _act(g, ACT)
    tl.store(dup_ptr + offs, (dy * a).to(dup_ptr.dtype.element_ty), mask=mask)
    tl.store(dgate_ptr + offs, (dy * u * da).to(dgate_ptr.dtype.element_ty), mask=mask)


def gated_forward(gate: torch.Tensor, up: torch.Tensor, act: str) -> torch.Tensor:
    """gate, up ``(..., intermediate)`` -> ``act(gate) * up`` of the same shape and dtype."""
    gate, up = gate.contiguous(), up.contiguous()
    out = torch.empty_like(gate)
    n = gate.numel()
    if n:
        _gated_fwd[(triton.cdiv(n, _BLOCK),)](gate, up, out, n, ACT=_ACT_IDS[act], BLOCK=_BLOCK)
    return out


def gated_backward(dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, act: str) -> tuple[torch.Tensor, ...]:
    """-> (d_gate, d_up), both shaped and typed like gate."""
    dy, gate, up = dy.contiguous(), gate.contiguous(), up.contiguous()
    d_gate, d_up = torch.empty_like(gate), torch.empty_like(up)
    n = gate.numel()
    if n:
        _gated_bwd[(triton.cdiv(n, _BLOCK),)](dy, gate, up, d_gate, d_up, n, ACT=_ACT_IDS[act], BLOCK=_BLOCK)
    return d_gate, d_up
