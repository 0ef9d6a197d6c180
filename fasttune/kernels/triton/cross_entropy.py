"""Triton cross-entropy rows for the fused linear cross-entropy: loss per row, gradient written over the logits.

One program per row: an online log-sum-exp over vocab blocks (fp32), then a second pass that overwrites the row with
``scale * (softmax(z) - onehot(y)) * (1 - tanh^2 if softcap)``. Formulas: see ``fasttune.kernels.cross_entropy``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["cross_entropy_rows"]

_BLOCK = 4096


@triton.jit
def _capped(x, softcap, HAS_SOFTCAP: tl.constexpr):
    """Returns (z, tanh) with z = softcap * tanh(x / softcap) when HAS_SOFTCAP, else (x, x)."""
    if HAS_SOFTCAP:
        u = tl.minimum(tl.maximum(x / softcap, -20.0), 20.0)
        t = 1.0 - 2.0 / (tl.exp(2.0 * u) + 1.0)
        z = softcap * t
    else:
        t = x
        z = x
    return z, t


@triton.jit
def _ce_rows(logits_ptr, targets_ptr, loss_ptr, scale_ptr, n_cols, stride_row, softcap, HAS_SOFTCAP: tl.constexpr,
             NEED_GRAD: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride_row
    target = tl.load(targets_ptr + row)
    m = float("-inf")
    s = 0.0
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < n_cols
        z, _ = _capped(tl.load(base + cols, mask=mask, other=0.0).to(tl.float32), softcap, HAS_SOFTCAP)
        z = tl.where(mask, z, float("-inf"))
        new_m = tl.maximum(m, tl.max(z, axis=0))
        s = s * tl.exp(m - new_m) + tl.sum(tl.exp(z - new_m), axis=0)
        m = new_m
    lse = m + tl.log(s)
    z_target, _ = _capped(tl.load(base + target).to(tl.float32), softcap, HAS_SOFTCAP)
    tl.store(loss_ptr + row, lse - z_target)
    if NEED_GRAD:
        scale = tl.load(scale_ptr).to(tl.float32)
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < n_cols
            z, t = _capped(tl.load(base + cols, mask=mask, other=0.0).to(tl.float32), softcap, HAS_SOFTCAP)
            grad = tl.exp(z - lse)
            grad = tl.where(cols == target, grad - 1.0, grad)
            if HAS_SOFTCAP:
                grad = grad * (1.0 - t * t)
            tl.store(base + cols, (grad * scale).to(logits_ptr.dtype.element_ty), mask=mask)


def cross_entropy_rows(logits: torch.Tensor, targets: torch.Tensor, softcap: float | None,
                       scale: torch.Tensor | None) -> torch.Tensor:
    """logits ``(c, V)`` with unit column stride, targets ``(c,)`` -> per-row loss ``(c,)`` fp32.

    With a ``scale`` (a 0-dim tensor, read on the device) the logits are overwritten in place with
    ``scale * d(loss_i)/d(logits_i)``.
    """
    if logits.stride(-1) != 1:
        raise ValueError(f"cross_entropy_rows: logits need a unit column stride, got strides {logits.stride()}")
    rows, cols = logits.shape
    losses = torch.empty(rows, dtype=torch.float32, device=logits.device)
    if rows:
        _ce_rows[(rows,)](logits, targets.contiguous(), losses, scale if scale is not None else losses, cols,
                          logits.stride(0), float(softcap) if softcap is not None else 1.0,
                          HAS_SOFTCAP=softcap is not None, NEED_GRAD=scale is not None,
                          BLOCK=min(_BLOCK, triton.next_power_of_2(cols)))
    return losses
