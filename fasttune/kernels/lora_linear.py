"""Fused LoRA projections that share one input: Q/K/V together, or a single projection (O, phi3's qkv_proj).

Forward, for each projection ``i``: ``y_i = x W_i^T + b_i + s_i (x A_i^T) B_i^T``.
Backward: ``dx = sum_i [dy_i W_i + s_i (dy_i B_i) A_i]``, ``dA_i = s_i (dy_i B_i)^T x``, ``dB_i = s_i dy_i^T (x A_i^T)``.

Saved for backward: ``x`` and the factors only. ``W_i`` is dequantized again in backward (never kept), ``x A_i^T``
is recomputed (N x r, cheap).
"""

from __future__ import annotations

import torch

from .lora_parts import LoraParts, project, project_backward


class LoRAProjections(torch.autograd.Function):
    """``x (..., in) -> tuple of y_i (..., out_i)``; see the module docstring for the formulas."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, parts: tuple[LoraParts, ...], *factors: torch.Tensor | None):
        flat = x.reshape(-1, x.shape[-1])
        outs = []
        for i, p in enumerate(parts):
            out = project(flat, p, factors[2 * i], factors[2 * i + 1])
            outs.append(out.view(*x.shape[:-1], out.shape[-1]))
        ctx.parts = parts
        ctx.save_for_backward(x, *factors)
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor | None):
        x, *factors = ctx.saved_tensors
        flat = x.reshape(-1, x.shape[-1])
        need_x = ctx.needs_input_grad[0]
        dx = None
        d_factors: list[torch.Tensor | None] = []
        for i, (p, grad) in enumerate(zip(ctx.parts, grads)):
            lora_A, lora_B = factors[2 * i], factors[2 * i + 1]
            if grad is None:
                d_factors += [None, None]
                continue
            g = grad.reshape(-1, grad.shape[-1])
            dxi, d_a, d_b = project_backward(g, flat, p, lora_A, lora_B, need_x=need_x)
            d_factors += [d_a, d_b]
            if dxi is not None:
                dx = dxi if dx is None else dx + dxi
        if dx is not None:
            dx = dx.view(x.shape)
        return (dx, None, *d_factors)


def lora_projections(x: torch.Tensor, parts: tuple[LoraParts, ...]) -> tuple[torch.Tensor, ...]:
    """Apply the fused projections ``parts`` to ``x`` ``(..., in)``; returns one ``(..., out_i)`` tensor each."""
    factors: list[torch.Tensor | None] = []
    for p in parts:
        factors += [p.lora_A, p.lora_B]
    return LoRAProjections.apply(x, parts, *factors)


def lora_linear(x: torch.Tensor, parts: LoraParts) -> torch.Tensor:
    """One fused LoRA projection (o_proj, down_proj outside a fused MLP, phi3's qkv_proj): ``(..., in) -> (..., out)``."""
    return lora_projections(x, (parts,))[0]
