"""Fast forwards for the submodules of one decoder layer: RMSNorm, the gated MLP, the attention projections.

Each ``make_*`` function returns a forward for one module instance. The forward reads the module's current children
on every call (so a peft adapter injected, disabled or merged after patching is seen), takes the fused path when it
can and otherwise calls the module's original forward, logging the reason once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import nn

from fasttune.kernels import rms_norm

from ..kernels.lora_linear import lora_linear, lora_projections
from ..kernels.lora_mlp import ACTIVATIONS, lora_mlp
from ..kernels.lora_parts import LoraParts, lora_parts
from ..notes import note_once

logger = logging.getLogger("fasttune.patch")

# transformers activation names -> fasttune's gated activations
HF_ACTIVATIONS: dict[str, str] = {
    "silu": "silu",
    "swish": "silu",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "gelu": "gelu",
}


def log_fallback_once(what: str, reason: str) -> None:
    """Log (at WARNING, once per distinct message) that ``what`` runs peft's/transformers' forward and why."""
    message = f"{what} uses the original forward: {reason}"
    note_once(f"patch.fallback: {message}", message, logger)


def make_norm_forward(norm: nn.Module, offset: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    """RMSNorm through :func:`fasttune.kernels.rms_norm`: ``x*w`` or, with ``offset``, Gemma's ``x*(1+w)``."""
    eps = float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))

    def forward(hidden_states: torch.Tensor) -> torch.Tensor:
        return rms_norm(hidden_states, norm.weight, eps, offset=offset)

    return forward


def _parts_or_reason(module: nn.Module, names: tuple[str, ...]) -> tuple[LoraParts, ...] | str:
    parts = []
    for name in names:
        p = lora_parts(getattr(module, name))
        if isinstance(p, str):
            return f"{name}: {p}"
        parts.append(p)
    return tuple(parts)


def make_mlp_forward(mlp: nn.Module, mlp_names: tuple[str, ...], activation: str,
                     original: Callable) -> Callable[[torch.Tensor], torch.Tensor]:
    """Fused LoRA MLP. ``mlp_names`` is ``(gate, up, down)`` or, for a fused gate/up, ``(gate_up, down)``."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation: {activation!r} has no fused MLP; supported: {sorted(ACTIVATIONS)}")

    def forward(x: torch.Tensor) -> torch.Tensor:
        parts = _parts_or_reason(mlp, mlp_names)
        if isinstance(parts, str):
            log_fallback_once(f"{type(mlp).__name__}", parts)
            return original(x)
        if len(parts) == 2:  # fused gate_up: the gate is the first half of the output rows
            gate_up, down = parts
            inter = down.base.in_features
            gate, up = gate_up.sliced(slice(0, inter)), gate_up.sliced(slice(inter, 2 * inter))
        else:
            gate, up, down = parts
        return lora_mlp(x, gate, up, down, activation)

    return forward


def make_projection_forward(proj: nn.Module, original: Callable) -> Callable[..., torch.Tensor]:
    """Fused single LoRA projection; also hands out an output the attention forward computed already (fused QKV)."""

    def forward(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        ready = proj.__dict__.pop("_fasttune_ready", None)
        if ready is not None and ready[0] is x and not args and not kwargs:
            return ready[1]
        parts = lora_parts(proj) if not args and not kwargs else "called with extra arguments"
        if isinstance(parts, str):
            log_fallback_once(type(proj).__name__, parts)
            return original(x, *args, **kwargs)
        return lora_linear(x, parts)

    forward._fasttune_projection = True
    return forward


def _takes_prepared_output(proj: nn.Module) -> bool:
    """Whether ``proj`` runs fasttune's projection forward (a peft layer injected after patching does not)."""
    return getattr(proj.__dict__.get("forward"), "_fasttune_projection", False)


def make_attention_forward(attn: nn.Module, qkv_names: tuple[str, ...], original: Callable) -> Callable:
    """Compute q, k, v in one fused function, then run the attention's own forward, which picks them up.

    The attention forward calls ``self.q_proj(hidden_states)`` etc.; each projection's patched forward returns the
    tensor prepared here when it is handed the same ``hidden_states`` object, so the attention maths (RoPE, q/k norms,
    softcapping, sliding windows, the attention kernel) stays transformers' own for every family.
    """

    def forward(hidden_states: torch.Tensor, *args, **kwargs):
        parts = _parts_or_reason(attn, qkv_names)
        if isinstance(parts, str) or not all(_takes_prepared_output(getattr(attn, n)) for n in qkv_names):
            if isinstance(parts, str):
                log_fallback_once(f"{type(attn).__name__} q/k/v", parts)
            return original(hidden_states, *args, **kwargs)
        projs = [getattr(attn, name) for name in qkv_names]
        outs = lora_projections(hidden_states, parts)
        for proj, out in zip(projs, outs):
            proj.__dict__["_fasttune_ready"] = (hidden_states, out)
        try:
            return original(hidden_states, *args, **kwargs)
        finally:
            for proj in projs:
                proj.__dict__.pop("_fasttune_ready", None)

    return forward
