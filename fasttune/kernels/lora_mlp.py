"""Fused LoRA MLP: gate/up/down projections with SwiGLU or GeGLU in one autograd function.

Forward (x ``(N, hidden)``):
    ``g = proj_gate(x)``, ``u = proj_up(x)`` ``(N, inter)``; ``h = act(g) * u``; ``y = proj_down(h)`` ``(N, hidden)``,
where each ``proj`` is ``x W^T + b + s (x A^T) B^T`` (see :mod:`fasttune.kernels.lora_parts`).

Backward: recompute ``g``, ``u`` (dequantizing ``W_gate``/``W_up`` again) and ``h``; then
``dh = dy W_down + s (dy B_down) A_down``, ``(dg, du) = act'`` applied to ``dh``, ``dx = dg W_gate + du W_up + LoRA
terms``; every ``dA``/``dB`` as in :func:`fasttune.kernels.lora_parts.project_backward`.

Saved: ``x``, the six factors and the small ``x [A_gate; A_up]^T`` / ``h A_down^T`` products. Inside a checkpoint recompute (:func:`fasttune.kernels.recompute.in_recompute`) the
layer's activations die with its backward anyway, so ``g`` and ``u`` are kept too and not recomputed a second time.
The activation comes from :mod:`fasttune.kernels` (``swiglu`` / ``geglu``) and its backward through autograd.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from fasttune.kernels import geglu, swiglu

from .lora_parts import LoraParts, Precision, project_group, project_group_backward
from .recompute import in_recompute

ACTIVATIONS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "silu": swiglu,
    "gelu_tanh": lambda gate, up: geglu(gate, up, approximate="tanh"),
    "gelu": lambda gate, up: geglu(gate, up, approximate="none"),
}


def _gated(activation: str, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return ACTIVATIONS[activation](gate, up)


class LoRAMLP(torch.autograd.Function):
    """``y = down(act(gate(x)) * up(x))`` for x ``(..., hidden)``; see the module docstring."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, parts: tuple[LoraParts, LoraParts, LoraParts], activation: str,
                *factors: torch.Tensor | None) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        gate_p, up_p, down_p = parts
        precision = Precision.of(x, parts, factors)
        (gate, up), xa_gu = project_group(flat, (gate_p, up_p), factors[:4], precision)
        hidden = _gated(activation, gate, up)
        (out,), xa_down = project_group(hidden, (down_p,), factors[4:6], precision)
        ctx.parts, ctx.activation, ctx.precision = parts, activation, precision
        ctx.kept = in_recompute()
        if ctx.kept:
            ctx.save_for_backward(x, xa_gu, xa_down, *factors, gate, up)
        else:
            ctx.save_for_backward(x, xa_gu, xa_down, *factors)
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        saved = ctx.saved_tensors
        x, xa_gu, xa_down, factors = saved[0], saved[1], saved[2], saved[3:9]
        gate_p, up_p, down_p = ctx.parts
        precision = ctx.precision
        flat = x.reshape(-1, x.shape[-1])
        if ctx.kept:
            gate, up = saved[9], saved[10]
        else:
            (gate, up), _ = project_group(flat, (gate_p, up_p), factors[:4], precision)
        with torch.enable_grad():
            gate = gate.detach().requires_grad_(True)
            up = up.detach().requires_grad_(True)
            hidden = _gated(ctx.activation, gate, up)
        g2 = grad.reshape(-1, grad.shape[-1])
        d_hidden, d_down = project_group_backward((g2,), hidden.detach(), (down_p,), factors[4:6], xa_down, precision)
        d_gate, d_up = torch.autograd.grad(hidden, (gate, up), d_hidden)
        need_x = ctx.needs_input_grad[0]
        dx, d_gu = project_group_backward((d_gate, d_up), flat, (gate_p, up_p), factors[:4], xa_gu, precision,
                                          need_x=need_x)
        return (None if dx is None else dx.view(x.shape)), None, None, *d_gu, *d_down


def lora_mlp(x: torch.Tensor, gate: LoraParts, up: LoraParts, down: LoraParts, activation: str) -> torch.Tensor:
    """Fused gated MLP over ``x`` ``(..., hidden)`` -> ``(..., hidden)``; ``activation`` in ``ACTIVATIONS``."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation: {activation!r} is not supported; choose one of {sorted(ACTIVATIONS)}")
    factors = (gate.lora_A, gate.lora_B, up.lora_A, up.lora_B, down.lora_A, down.lora_B)
    return LoRAMLP.apply(x, (gate, up, down), activation, *factors)
