"""The vision tower's fast path: every LoRA linear of a VLM's vision tower and projector as one fused function.

A vision-language family's tower and projector are where its ``VisionSpec.mmproj`` says (``MMProjMap.module_paths``:
Qwen2-VL's ``model.visual``, Gemma 3's ``model.vision_tower`` and ``model.multi_modal_projector``). Their blocks keep
transformers' own forward -- the norms (a fused ``native_layer_norm`` already), the attention over each image's
patches one image at a time (Qwen2-VL splits its packed patches at ``cu_seqlens``; no padded batch), rotary
embeddings, the activation -- and each linear layer inside them runs :func:`fasttune.kernels.lora_linear.lora_linear`
through :func:`fasttune.patch.forwards.make_projection_forward`: ``x W^T + b + s (x A^T) B^T`` as one autograd
Function that keeps only ``x`` and the factors (peft keeps ``x``, its dropout's output and ``x A^T`` per layer, over
four modules and as many autograd nodes). Layers without an adapter run the same function with no factors; a layer the
fused path cannot serve (DoRA, dropout > 0, a trainable base) falls back to peft's forward, logged once.

The tower's blocks are checkpointed like the text layers (transformers' per-layer hook, which
:func:`fasttune.patch.checkpointing.enable_checkpointing` sets for every ``GradientCheckpointingLayer`` of the model,
the tower's blocks included): the offloaded checkpoint keeps each block's input only.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch
from torch import nn

from fasttune.models import get_vision_family
from fasttune.quant import is_quantized_linear

from ..kernels.segment_attention import segment_attention
from .forwards import log_fallback_once, make_projection_forward


def tower_prefixes(hf_model: nn.Module) -> tuple[str, ...]:
    """The module-name prefixes of ``hf_model``'s vision tower and projector (its family's mmproj map), or ``()``."""
    vision = get_vision_family(getattr(hf_model.config, "model_type", ""))
    if vision is None or vision.mmproj is None:
        return ()
    return vision.mmproj.module_paths


# what the model's forward passes down to the tower's attention that its SDPA path ignores too (max_seqlen is for
# flash-attention's varlen kernel; the tower's attention returns no weights and no hidden states)
_IGNORED_KWARGS = frozenset({"position_embeddings", "max_seqlen", "output_attentions", "output_hidden_states"})


def _packed_attention_reason(attn: nn.Module, hidden_states: torch.Tensor, kwargs: dict) -> str | None:
    if hidden_states.device.type != "cpu":
        return f"the tower runs on {hidden_states.device.type} (the kept-attention kernel is CPU-only)"
    if attn.config._attn_implementation != "sdpa":
        return f"attn_implementation={attn.config._attn_implementation!r} (only 'sdpa' is replaced)"
    if attn.training and attn.attention_dropout:
        return f"attention dropout {attn.attention_dropout}"
    if kwargs.get("position_embeddings") is None or set(kwargs) - _IGNORED_KWARGS:
        return f"called with {sorted(kwargs)} (expected position_embeddings and {sorted(_IGNORED_KWARGS)})"
    return None


def make_packed_attention_forward(attn: nn.Module, original: Callable) -> Callable[..., torch.Tensor]:
    """Qwen's packed tower attention (``VisionSpec.tower_attention``): transformers' maths -- fused ``qkv``, 2-D
    rotary on q and k (the model module's own ``apply_rotary_pos_emb_vision``), attention within each ``cu_seqlens``
    segment, ``proj`` -- with the attention through :func:`fasttune.kernels.segment_attention.segment_attention`."""
    rotary = sys.modules[type(attn).__module__].apply_rotary_pos_emb_vision

    def forward(hidden_states: torch.Tensor, cu_seqlens: torch.Tensor, **kwargs) -> torch.Tensor:
        reason = _packed_attention_reason(attn, hidden_states, kwargs)
        if reason is not None:
            log_fallback_once(f"{type(attn).__name__} (vision tower)", reason)
            return original(hidden_states, cu_seqlens=cu_seqlens, **kwargs)
        n = hidden_states.shape[0]
        q, k, v = attn.qkv(hidden_states).reshape(n, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        cos, sin = kwargs["position_embeddings"]
        q, k = rotary(q, k, cos, sin)
        lengths = tuple((cu_seqlens[1:] - cu_seqlens[:-1]).tolist())
        out = segment_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), lengths, attn.scaling)
        return attn.proj(out.transpose(0, 1).reshape(n, -1))

    return forward


def tower_attentions(hf_model: nn.Module) -> list[nn.Module]:
    """The tower's attention modules of the class its family's ``VisionSpec.tower_attention`` names."""
    vision = get_vision_family(getattr(hf_model.config, "model_type", ""))
    if vision is None or vision.tower_attention is None:
        return []
    return [m for m in hf_model.modules() if type(m).__name__ == vision.tower_attention]


def _is_linear(module: nn.Module) -> bool:
    base = getattr(module, "base_layer", module)
    return isinstance(base, nn.Linear) or is_quantized_linear(base)


def tower_linears(hf_model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, layer)`` of every linear layer (the peft LoRA layer where one wraps it) in the tower and projector."""
    prefixes = tower_prefixes(hf_model)
    found: list[tuple[str, nn.Module]] = []
    inner: set[str] = set()  # a LoRA layer's own children (its base layer, lora_A/lora_B linears) are not patched
    for name, module in hf_model.named_modules():
        if not any(name.startswith(p + ".") for p in prefixes) or any(name.startswith(i + ".") for i in inner):
            continue
        if _is_linear(module):
            found.append((name, module))
            inner.add(name)
    return found


def patch_vision_tower(hf_model: nn.Module, record) -> int:
    """Install the fused projection forward on every tower/projector linear of ``hf_model`` and the packed attention
    forward on its family's tower attentions (recorded in ``record``, a :class:`fasttune.patch.model.PatchRecord`);
    returns how many forwards. A text model has none."""
    layers = tower_linears(hf_model)
    for _, layer in layers:
        record.install(layer, make_projection_forward(layer, layer.forward))
    attentions = tower_attentions(hf_model)
    for attn in attentions:
        record.install(attn, make_packed_attention_forward(attn, attn.forward))
    return len(layers) + len(attentions)
