"""Triton RMSNorm: one program per row forward; backward with per-program partial sums of dw.

Formulas: see ``fasttune.kernels.rms_norm``. Rows are ``(rows, hidden)`` contiguous; rstd is fp32 ``(rows,)``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["rms_norm_backward", "rms_norm_forward"]


@triton.jit
def _rms_norm_fwd(x_ptr, w_ptr, y_ptr, rstd_ptr, n_cols, eps, OFFSET: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * n_cols + cols, mask=mask, other=0.0)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / n_cols + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if OFFSET:
        y = xf * rstd * (w + 1.0)
    else:
        y = (xf * rstd).to(x.dtype).to(tl.float32) * w
    tl.store(y_ptr + row * n_cols + cols, y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def _rms_norm_bwd(dy_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dw_ptr, n_rows, n_cols, rows_per_program,
                  OFFSET: tl.constexpr, NEED_DX: tl.constexpr, NEED_DW: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if OFFSET:
        w = w + 1.0
    dw_acc = tl.zeros((BLOCK,), dtype=tl.float32)
    start = pid * rows_per_program
    for i in range(0, rows_per_program):
        row = (start + i).to(tl.int64)
        if row < n_rows:
            dy = tl.load(dy_ptr + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
            x = tl.load(x_ptr + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(rstd_ptr + row)
            xhat = x * rstd
            if NEED_DW:
                dw_acc += dy * xhat
            if NEED_DX:
                g = dy * w
                dot = tl.sum(g * xhat, axis=0) / n_cols
                dx = (g - xhat * dot) * rstd
                tl.store(dx_ptr + row * n_cols + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)
    if NEED_DW:
        tl.store(dw_ptr + pid * n_cols + cols, dw_acc, mask=mask)


def _block(n_cols: int) -> int:
    block = triton.next_power_of_2(n_cols)
    if block > 65536:
        raise ValueError(f"rms_norm (triton): hidden size {n_cols} is above the 65536 one row can hold; "
                         "use the torch backend")
    return block


def rms_norm_forward(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: bool) -> tuple[torch.Tensor, ...]:
    """x ``(rows, hidden)`` -> (y ``(rows, hidden)``, rstd ``(rows,)`` fp32)."""
    x = x.contiguous()
    rows, cols = x.shape
    out_dtype = x.dtype if offset else torch.promote_types(x.dtype, weight.dtype)
    y = torch.empty((rows, cols), dtype=out_dtype, device=x.device)
    rstd = torch.empty(rows, dtype=torch.float32, device=x.device)
    if rows:
        _rms_norm_fwd[(rows,)](x, weight.contiguous(), y, rstd, cols, eps, OFFSET=offset, BLOCK=_block(cols))
    return y, rstd


def rms_norm_backward(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor, offset: bool, need_dx: bool,
    need_dw: bool, programs: int | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """-> (dx ``(rows, hidden)`` in x.dtype or None, dw ``(hidden,)`` fp32 or None)."""
    dy, x = dy.contiguous(), x.contiguous()
    rows, cols = x.shape
    if programs is None:
        programs = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 4
    programs = max(1, min(programs, rows))
    per_program = triton.cdiv(rows, programs)
    dx = torch.empty_like(x) if need_dx else None
    partial = torch.empty((programs, cols), dtype=torch.float32, device=x.device) if need_dw else None
    if rows:
        _rms_norm_bwd[(programs,)](dy, x, weight.contiguous(), rstd, dx if need_dx else x,
                                   partial if need_dw else rstd, rows, cols, per_program, OFFSET=offset,
                                   NEED_DX=need_dx, NEED_DW=need_dw, BLOCK=_block(cols))
    dw = partial.sum(0) if need_dw else None
    if need_dw and not rows:
        dw = torch.zeros(cols, dtype=torch.float32, device=x.device)
    return dx, dw
