"""The sparse (mixture-of-experts) block's forward through :func:`fasttune.kernels.moe.moe_experts`.

The block's own router runs unchanged (so transformers' router-logit recording, the load-balancing loss and a LoRA
the user put on the router keep working); its experts go through the grouped, split-LoRA path. LoRA on the experts
is peft's ``target_parameters`` form: one ``ParamWrapper`` per adapted 3-D parameter, nested around the experts
module. Anything the grouped path does not compute exactly (several active adapters, dropout, a LoRA bias, merged or
disabled adapters in an unusual state, experts that are themselves trained, Mixtral's router jitter in training) falls
back to the block's original forward, logged once with the reason.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from fasttune.kernels.moe import ExpertLayout, ExpertLora, moe_experts
from fasttune.models import MoESpec

from .forwards import log_fallback_once


def _is_param_wrapper(module: nn.Module) -> bool:
    return hasattr(module, "parameter_name") and hasattr(module, "lora_A") and hasattr(module, "base_layer")


def _wrapper_lora(wrapper: nn.Module) -> ExpertLora | None | str:
    """The one active adapter of a peft ``ParamWrapper`` (None: no adapter applies), or why it cannot be used."""
    if getattr(wrapper, "disable_adapters", False):
        return None
    merged = set(getattr(wrapper, "merged_adapters", []))
    active = [a for a in wrapper.active_adapters if a in wrapper.lora_A]
    if any(a in merged for a in active):
        return "an adapter is merged into the experts"
    if not active:
        return None
    if len(active) > 1:
        return f"{len(active)} adapters are active at once"
    adapter = active[0]
    if not isinstance(wrapper.lora_dropout[adapter], nn.Identity):
        return "lora_dropout is set"
    if wrapper.lora_B[adapter].bias is not None:
        return "lora_bias is set"
    return ExpertLora(wrapper.lora_A[adapter].weight, wrapper.lora_B[adapter].weight, float(wrapper.scaling[adapter]))


def expert_parts(experts: nn.Module, moe: MoESpec) -> tuple[nn.Module, dict[str, ExpertLora]] | str:
    """``(the experts module, {parameter name: its LoRA})`` under any peft wrappers, or the reason to fall back."""
    loras: dict[str, ExpertLora] = {}
    while _is_param_wrapper(experts):
        lora = _wrapper_lora(experts)
        if isinstance(lora, str):
            return lora
        if lora is not None:
            loras[experts.parameter_name] = lora
        experts = experts.base_layer
    unknown = set(loras) - {moe.gate_up, moe.down}
    if unknown:
        return f"LoRA on expert parameter(s) {sorted(unknown)}, not on {moe.gate_up} / {moe.down}"
    names = [moe.gate_up, moe.down] + ([f"{moe.gate_up}_bias", f"{moe.down}_bias"] if moe.bias else [])
    for name in names:
        param = getattr(experts, name, None)
        if not isinstance(param, torch.Tensor):
            return f"the experts have no {name}"
        if param.requires_grad:
            return f"the experts' {name} is trained (full fine-tuning of experts runs transformers' experts)"
    return experts, loras


def _layout(experts: nn.Module, moe: MoESpec) -> ExpertLayout | str:
    if moe.activation == "clamped_swiglu":
        return ExpertLayout(moe.transposed, moe.interleaved, moe.activation, float(getattr(experts, moe.alpha)),
                            float(getattr(experts, moe.limit)))
    act = getattr(experts, "act_fn", None)
    if not (isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation"):  # torch's, or transformers' own
        return f"the experts' activation is {type(act).__name__}, not SiLU"
    return ExpertLayout(moe.transposed, moe.interleaved, "silu")


def make_moe_forward(block: nn.Module, moe: MoESpec, original: Callable) -> Callable:
    """The grouped forward for one sparse block instance (reads the block's children on every call)."""

    def forward(hidden_states: torch.Tensor):
        parts = expert_parts(getattr(block, moe.experts), moe)
        if not isinstance(parts, str) and block.training and getattr(block, "jitter_noise", 0.0):
            parts = "router_jitter_noise is set in training"
        layout = _layout(parts[0], moe) if not isinstance(parts, str) else parts
        if isinstance(layout, str):
            log_fallback_once(type(block).__name__, layout)
            return original(hidden_states)
        experts, loras = parts
        shape = hidden_states.shape
        flat = hidden_states.reshape(-1, shape[-1])
        _, scores, indices = getattr(block, moe.router)(flat)
        bias = (getattr(experts, f"{moe.gate_up}_bias"), getattr(experts, f"{moe.down}_bias")) if moe.bias \
            else (None, None)
        out = moe_experts(flat, scores, indices, getattr(experts, moe.gate_up), getattr(experts, moe.down), layout,
                          *bias, loras.get(moe.gate_up), loras.get(moe.down)).reshape(shape)
        return (out, scores) if moe.returns_scores else out

    return forward
