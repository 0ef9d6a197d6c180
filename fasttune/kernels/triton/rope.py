"""Triton RoPE: one program per (batch, token), all heads of that token at once.

Formulas: see ``fasttune.kernels.rope``. x may be any strided ``(b, h, s, d)`` view whose last dim is contiguous
(transformers hands q/k as a transpose of ``(b, s, h, d)``); the output is a new contiguous ``(b, h, s, d)`` tensor.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["rope_rotate"]


@triton.jit
def _rope_kernel(x_ptr, cos_ptr, sin_ptr, y_ptr, n_heads, seq, sxb, sxh, sxs, syb, syh, sys, scb, scs,
                 HALF: tl.constexpr, BLOCK_HEADS: tl.constexpr, BLOCK_HALF: tl.constexpr, INVERSE: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    b = pid // seq
    s = pid % seq
    d = tl.arange(0, BLOCK_HALF)
    dmask = d < HALF
    cs_base = b * scb + s * scs
    c1 = tl.load(cos_ptr + cs_base + d, mask=dmask, other=0.0).to(tl.float32)[None, :]
    c2 = tl.load(cos_ptr + cs_base + HALF + d, mask=dmask, other=0.0).to(tl.float32)[None, :]
    s1 = tl.load(sin_ptr + cs_base + d, mask=dmask, other=0.0).to(tl.float32)[None, :]
    s2 = tl.load(sin_ptr + cs_base + HALF + d, mask=dmask, other=0.0).to(tl.float32)[None, :]
    h = tl.arange(0, BLOCK_HEADS)[:, None]
    mask = (h < n_heads) & dmask[None, :]
    x_base = x_ptr + b * sxb + s * sxs + h * sxh + d[None, :]
    y_base = y_ptr + b * syb + s * sys + h * syh + d[None, :]
    x1 = tl.load(x_base, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_base + HALF, mask=mask, other=0.0).to(tl.float32)
    if INVERSE:
        y1 = x1 * c1 + x2 * s2
        y2 = x2 * c2 - x1 * s1
    else:
        y1 = x1 * c1 - x2 * s1
        y2 = x2 * c2 + x1 * s2
    tl.store(y_base, y1.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(y_base + HALF, y2.to(y_ptr.dtype.element_ty), mask=mask)


def rope_rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool) -> torch.Tensor:
    """x ``(b, h, s, d)``; cos/sin ``(b or 1, s, d)`` -> rotated x, contiguous, dtype promoted as torch would."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    cos, sin = cos.contiguous(), sin.contiguous()
    b, heads, seq, dim = x.shape
    y = torch.empty((b, heads, seq, dim), dtype=torch.promote_types(x.dtype, cos.dtype), device=x.device)
    if y.numel():
        cb = 0 if cos.shape[0] == 1 else cos.stride(0)
        _rope_kernel[(b * seq,)](x, cos, sin, y, heads, seq, x.stride(0), x.stride(1), x.stride(2), y.stride(0),
                                 y.stride(1), y.stride(2), cb, cos.stride(1), HALF=dim // 2,
                                 BLOCK_HEADS=triton.next_power_of_2(heads),
                                 BLOCK_HALF=triton.next_power_of_2(dim // 2), INVERSE=inverse)
    return y
