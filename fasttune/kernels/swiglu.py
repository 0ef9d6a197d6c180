"""Gated MLP activations: SwiGLU ``silu(gate) * up`` and GeGLU ``gelu(gate) * up`` (tanh or exact gelu).

One autograd function serves the three activations ``act`` in ``{"silu", "gelu_tanh", "gelu"}``::

    forward:   h = act(gate) * up
    backward:  d_up = dy * act(gate)        d_gate = dy * up * act'(gate)

    silu:      act = g * sig(g)                          act' = sig(g) * (1 + g * (1 - sig(g)))
    gelu_tanh: t = tanh(k * (g + c * g^3)), k = sqrt(2/pi), c = 0.044715
               act = 0.5 * g * (1 + t)                  act' = 0.5 * (1 + t) + 0.5 * g * (1 - t^2) * k * (1 + 3c * g^2)
    gelu:      act = g * Phi(g)                          act' = Phi(g) + g * exp(-g^2 / 2) / sqrt(2 pi)

It saves only gate and up and recomputes the activation in backward; autograd on the reference also keeps
``act(gate)``, a third tensor of the MLP's widest size, for every layer. The torch path uses torch's own fused
activation-backward kernels (the activation in fp32 inside, rounded once, as autograd does); the Triton kernels
implement the formulas above in fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fasttune.kernels.compiling import cpu_compiled
from fasttune.kernels.dispatch import select_backend
from fasttune.kernels.reference import geglu_ref, swiglu_ref

__all__ = ["GatedActivationFunction", "geglu", "swiglu"]

ACTIVATIONS = ("silu", "gelu_tanh", "gelu")


def _activation(gate: torch.Tensor, act: str) -> torch.Tensor:
    if act == "silu":
        return F.silu(gate)
    return F.gelu(gate, approximate="tanh" if act == "gelu_tanh" else "none")


@cpu_compiled
def _forward_torch(gate: torch.Tensor, up: torch.Tensor, act: str) -> torch.Tensor:
    """``act(gate) * up`` in the inputs' dtype (torch computes the activation in fp32 internally)."""
    return _activation(gate, act).mul_(up)


@cpu_compiled
def _backward_torch(dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, act: str, need_gate: bool,
                    need_up: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(d_gate, d_up) by torch's fused activation-backward kernels: ``d_gate = act'(gate) * (dy * up)``,
    ``d_up = act(gate) * dy`` (the activation is recomputed here instead of being saved)."""
    d_up = _activation(gate, act).mul_(dy) if need_up else None
    d_gate = None
    if need_gate:
        if act == "silu":
            d_gate = torch.ops.aten.silu_backward(dy * up, gate)
        else:
            d_gate = torch.ops.aten.gelu_backward(dy * up, gate, approximate="tanh" if act == "gelu_tanh" else "none")
    return d_gate, d_up


class GatedActivationFunction(torch.autograd.Function):
    """``GatedActivationFunction.apply(gate, up, act, backend)``; gate, up ``(..., intermediate)``."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor, act: str, backend: str) -> torch.Tensor:
        if backend == "triton":
            from fasttune.kernels.triton.swiglu import gated_forward

            out = gated_forward(gate, up, act)
        else:
            out = _forward_torch(gate, up, act)
        ctx.save_for_backward(gate, up)
        ctx.act, ctx.backend = act, backend
        return out

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        gate, up = ctx.saved_tensors
        need_gate, need_up = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if ctx.backend == "triton":
            from fasttune.kernels.triton.swiglu import gated_backward

            d_gate, d_up = gated_backward(dy, gate, up, ctx.act)
        else:
            d_gate, d_up = _backward_torch(dy, gate, up, ctx.act, need_gate, need_up)
        return (d_gate if need_gate else None), (d_up if need_up else None), None, None


def _check(gate: torch.Tensor, up: torch.Tensor, name: str) -> None:
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(f"{name}: gate {tuple(gate.shape)} {gate.dtype} and up {tuple(up.shape)} {up.dtype} must "
                         "have the same shape and dtype")


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` for gate, up ``(..., intermediate)``; saves only gate and up for backward."""
    _check(gate, up, "swiglu")
    backend = select_backend(gate)
    if backend == "reference":
        return swiglu_ref(gate, up)
    return GatedActivationFunction.apply(gate, up, "silu", backend)


def geglu(gate: torch.Tensor, up: torch.Tensor, approximate: str = "tanh") -> torch.Tensor:
    """``gelu(gate, approximate) * up``, ``approximate`` in ``{"tanh", "none"}`` (Gemma uses ``"tanh"``)."""
    if approximate not in ("tanh", "none"):
        raise ValueError(f"geglu: approximate={approximate!r} is not supported; allowed values are 'tanh', 'none'")
    _check(gate, up, "geglu")
    backend = select_backend(gate)
    if backend == "reference":
        return geglu_ref(gate, up, approximate)
    return GatedActivationFunction.apply(gate, up, "gelu_tanh" if approximate == "tanh" else "gelu", backend)
