"""RMSNorm, ``x * w`` (Llama) or ``x * (1 + w)`` (Gemma), as one autograd function that saves only x and rstd.

Forward (per row of ``hidden`` values, in fp32)::

    rstd = 1 / sqrt(mean(x^2) + eps)        xhat = x * rstd
    y    = w * xhat.to(x.dtype)             (offset=False, as transformers' LlamaRMSNorm)
    y    = (xhat * (1 + w)).to(x.dtype)     (offset=True,  as transformers' GemmaRMSNorm)

Backward, with ``w_eff = w`` or ``1 + w`` and ``g = dy * w_eff``::

    dx = rstd * (g - xhat * mean(g * xhat))     dw = sum_rows(dy * xhat)

The reference keeps an fp32 copy of x, the normalised output and more for autograd; this keeps x (which the residual
stream holds anyway) and one fp32 value per row. ``dw`` is not computed at all when the weight is frozen.
"""

from __future__ import annotations

import torch

from fasttune.kernels.compiling import cpu_compiled
from fasttune.kernels.dispatch import select_backend
from fasttune.kernels.reference import rms_norm_ref

__all__ = ["RMSNormFunction", "rms_norm"]


@cpu_compiled
def _forward_torch(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: bool) -> tuple[torch.Tensor, ...]:
    """x: ``(rows, hidden)`` -> (y ``(rows, hidden)``, rstd ``(rows,)`` fp32)."""
    xf = x.float()
    rstd = torch.rsqrt(xf.square().mean(-1, keepdim=True).add_(eps))
    normed = xf * rstd
    if offset:
        y = normed.mul_(weight.float() + 1.0).to(x.dtype)
    else:
        y = weight * normed.to(x.dtype)
    return y, rstd.squeeze(-1)


@cpu_compiled
def _backward_torch(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor, offset: bool, need_dx: bool,
    need_dw: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """dy, x: ``(rows, hidden)``; rstd: ``(rows,)`` -> (dx ``(rows, hidden)`` in x.dtype, dw ``(hidden,)`` fp32)."""
    rstd = rstd.unsqueeze(-1)
    xhat = x.float() * rstd
    dyf = dy.float()
    dw = (dyf * xhat).sum(0) if need_dw else None
    dx = None
    if need_dx:
        w_eff = weight.float() + 1.0 if offset else weight.float()
        g = dyf * w_eff
        dot = (g * xhat).mean(-1, keepdim=True)
        dx = g.sub_(xhat.mul_(dot)).mul_(rstd).to(x.dtype)
    return dx, dw


class RMSNormFunction(torch.autograd.Function):
    """``RMSNormFunction.apply(x, weight, eps, offset, backend)``; x ``(..., hidden)``, weight ``(hidden,)``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float, offset: bool, backend: str) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        if backend == "triton":
            from fasttune.kernels.triton.rms_norm import rms_norm_forward

            y, rstd = rms_norm_forward(rows, weight, eps, offset)
        else:
            y, rstd = _forward_torch(rows, weight, eps, offset)
        ctx.save_for_backward(rows, weight, rstd)
        ctx.offset, ctx.backend, ctx.x_shape = offset, backend, x.shape
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        rows, weight, rstd = ctx.saved_tensors
        need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dy = dy.reshape(-1, dy.shape[-1])
        if ctx.backend == "triton":
            from fasttune.kernels.triton.rms_norm import rms_norm_backward

            dx, dw = rms_norm_backward(dy, rows, weight, rstd, ctx.offset, need_dx, need_dw)
        else:
            dx, dw = _backward_torch(dy, rows, weight, rstd, ctx.offset, need_dx, need_dw)
        dx = dx.view(ctx.x_shape) if dx is not None else None
        dw = dw.to(weight.dtype) if dw is not None else None
        return dx, dw, None, None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: bool = False) -> torch.Tensor:
    """RMSNorm of x ``(..., hidden)`` with weight ``(hidden,)``: ``x*w`` or, with ``offset=True``, Gemma's ``x*(1+w)``.

    Statistics are accumulated in fp32; the output has x's dtype (promoted with w's for ``offset=False``, as
    transformers does). Gradients flow to x and, only when ``weight.requires_grad``, to the weight.
    """
    if x.shape[-1] != weight.shape[-1] or weight.dim() != 1:
        raise ValueError(f"rms_norm: weight shape {tuple(weight.shape)} does not match x's last dim {x.shape[-1]}; "
                         "expected a 1-D weight of that size")
    backend = select_backend(x)
    if backend == "reference":
        return rms_norm_ref(x, weight, eps, offset)
    return RMSNormFunction.apply(x, weight, float(eps), bool(offset), backend)
