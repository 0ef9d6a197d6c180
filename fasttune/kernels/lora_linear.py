"""Fused LoRA projections that share one input: Q/K/V together, or a single projection (O, phi3's qkv_proj).

Forward, for each projection ``i``: ``y_i = x W_i^T + b_i + s_i (x A_i^T) B_i^T``.
Backward: ``dx = sum_i [dy_i W_i + s_i (dy_i B_i) A_i]``, ``dA_i = s_i (dy_i B_i)^T x``, ``dB_i = s_i dy_i^T (x A_i^T)``.

Saved for backward: ``x``, the factors and ``x [A_i]^T`` (N x sum r_i, one product for all adapters of the group).
``W_i`` is dequantized again in backward (never kept). Dtypes: :class:`fasttune.kernels.lora_parts.Precision`.
"""

from __future__ import annotations

import torch

from .lora_parts import LoraParts, Precision, project_group, project_group_backward


class LoRAProjections(torch.autograd.Function):
    """``x (..., in) -> tuple of y_i (..., out_i)``; see the module docstring for the formulas."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, parts: tuple[LoraParts, ...], *factors: torch.Tensor | None):
        flat = x.reshape(-1, x.shape[-1])
        precision = Precision.of(x, parts, factors)
        outs, xa = project_group(flat, parts, factors, precision)
        ctx.parts, ctx.precision = parts, precision
        ctx.save_for_backward(x, xa, *factors)
        return tuple(out.view(*x.shape[:-1], out.shape[-1]) for out in outs)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor | None):
        x, xa, *factors = ctx.saved_tensors
        flat = x.reshape(-1, x.shape[-1])
        flat_grads = tuple(None if g is None else g.reshape(-1, g.shape[-1]) for g in grads)
        dx, d_factors = project_group_backward(flat_grads, flat, ctx.parts, tuple(factors), xa, ctx.precision,
                                               need_x=ctx.needs_input_grad[0])
        return (None if dx is None else dx.view(x.shape), None, *d_factors)


def lora_projections(x: torch.Tensor, parts: tuple[LoraParts, ...]) -> tuple[torch.Tensor, ...]:
    """Apply the fused projections ``parts`` to ``x`` ``(..., in)``; returns one ``(..., out_i)`` tensor each."""
    factors: list[torch.Tensor | None] = []
    for p in parts:
        factors += [p.lora_A, p.lora_B]
    return LoRAProjections.apply(x, parts, *factors)


def lora_linear(x: torch.Tensor, parts: LoraParts) -> torch.Tensor:
    """One fused LoRA projection (o_proj, down_proj outside a fused MLP, phi3's qkv_proj): ``(..., in) -> (..., out)``."""
    return lora_projections(x, (parts,))[0]
