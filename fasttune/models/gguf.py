"""How a family is written to GGUF, as data: tensor names, value transforms and hyper-parameter facts.

``{}`` in a name stands for the layer index. Each ``TensorMap`` also says how a tensor's values change on the way:

- ``permute_qk``: llama.cpp's "llama" architecture applies RoPE to interleaved pairs (x0, x1), (x2, x3), ...
  while transformers' Llama rotates halves (x_i, x_{i + d/2}). The rows of q_proj / k_proj are reordered per head so
  that both compute the same thing: rows ``[h, 2, d/2]`` -> ``[h, d/2, 2]`` (see
  ``fasttune.export.gguf.tensor_maps.permute_rows``). Families that llama.cpp runs with NeoX-style RoPE (qwen2, qwen3,
  gemma*, phi3) need no permutation.
- ``norm_offset``: Gemma's RMSNorm computes ``x * (1 + w)``; llama.cpp's computes ``x * w``, so ``1`` is added to every
  norm weight (including Gemma 3's q/k norms) when writing.
- ``output_optional``: the architecture falls back to ``token_embd`` when the file has no ``output.weight`` (tied
  embeddings). Gemma 1/2 always use ``token_embd``, so a Gemma model with an untied head cannot be written.
- a :class:`Split` instead of a name: one transformers tensor that is not one GGUF tensor as it is. Mixture-of-experts
  families store every expert's gate and up projections fused (``gate_up_proj``, ``(E, 2I, H)``), llama.cpp wants
  ``ffn_gate_exps`` and ``ffn_up_exps`` ``(E, I, H)``; gpt-oss stores its experts transposed ``(E, in, out)`` with
  gate and up interleaved along the outputs. The Split says which parts, in which order, and how they are cut.

and which ``<arch>.*`` hyper-parameters beyond the common ones llama.cpp's architecture reads (see the field
comments). The name blocks below are shared by the family files, which compose their maps from them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

# How llama.cpp's architecture treats ``config.sliding_window``:
# "per_layer": window size and a per-layer on/off pattern from ``config.layer_types`` (gemma2, gemma3);
# "all_layers": one window for every layer (phi3);
# "ignored": the architecture has no window; a model using one matches llama.cpp only up to the window (a warning).
SlidingWindowKind = Literal["per_layer", "all_layers", "ignored"]
# "attn_and_final": attention-score and final-logit tanh caps, both always written (0.0 when unset; gemma2);
# "final": the final-logit cap, written when the config sets one (gemma3); None: no softcapping.
SoftcappingKind = Literal["attn_and_final", "final"] | None


@dataclass(frozen=True)
class Split:
    """One transformers tensor written as several GGUF tensors (or as one, reordered), named in order.

    The tensor is cut into ``len(names)`` equal chunks along ``dim`` (or, with ``squeeze``, index ``i`` of ``dim`` is
    tensor ``i``). ``interleaved``: the parts alternate along ``dim`` instead (part ``k`` takes slices ``k, k + n, ...``
    for ``n`` parts: gpt-oss's gate/up). ``transposed``: transformers stores the matrix as ``(..., in, out)``; its last
    two axes are swapped into GGUF's ``(..., out, in)`` before cutting (gpt-oss's experts). Read by
    ``fasttune.export.gguf.tensor_maps.split_tensor`` / ``join_tensor``.
    """

    dim: int
    names: tuple[str, ...]
    squeeze: bool = False
    interleaved: bool = False
    transposed: bool = False


@dataclass(frozen=True)
class TensorMap:
    """How one family's tensors are named and transformed in GGUF, and which extra hyper-parameters it writes."""

    arch: str  # gguf architecture name (gguf.MODEL_ARCH_NAMES value)
    names: dict[str, str | Split]  # transformers name (with {} for the layer) -> GGUF name (or several: Split)
    permute_qk: bool = False
    norm_offset: float = 0.0
    output_optional: bool = True
    q_name: str = "model.layers.{}.self_attn.q_proj.weight"
    k_name: str = "model.layers.{}.self_attn.k_proj.weight"
    softcapping: SoftcappingKind = None
    sliding_window: SlidingWindowKind = "ignored"
    rope_base_swa: bool = False  # sliding layers have their own RoPE base (gemma3: rope_parameters per layer type)
    rope_orig_ctx: bool = False  # the arch reads rope.scaling.original_context_length even unscaled (phi3)
    rope_sections: bool = False  # multimodal RoPE: the arch reads rope.dimension_sections (qwen2vl's mrope_section)
    # Mixture of experts: <arch>.expert_count / expert_used_count are written; ``expert_width`` names the config
    # attribute written as <arch>.expert_feed_forward_length (None: the arch takes the experts' width from
    # feed_forward_length, as llama's does for Mixtral).
    moe: bool = False
    expert_width: str | None = None
    # config values llama.cpp's architecture hard-codes (qwen3moe always renormalises the top-k weights; gpt-oss's
    # clamp is 7): a model with another value cannot be written faithfully, and writing it is an error naming it.
    fixed: dict[str, Any] = field(default_factory=dict)


GLOBAL = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
ATTN = {
    "model.layers.{}.self_attn.q_proj.weight": "blk.{}.attn_q.weight",
    "model.layers.{}.self_attn.k_proj.weight": "blk.{}.attn_k.weight",
    "model.layers.{}.self_attn.v_proj.weight": "blk.{}.attn_v.weight",
    "model.layers.{}.self_attn.o_proj.weight": "blk.{}.attn_output.weight",
}
ATTN_BIAS = {
    "model.layers.{}.self_attn.q_proj.bias": "blk.{}.attn_q.bias",
    "model.layers.{}.self_attn.k_proj.bias": "blk.{}.attn_k.bias",
    "model.layers.{}.self_attn.v_proj.bias": "blk.{}.attn_v.bias",
}
QK_NORM = {  # per-head RMSNorm on q and k (qwen3, gemma3)
    "model.layers.{}.self_attn.q_norm.weight": "blk.{}.attn_q_norm.weight",
    "model.layers.{}.self_attn.k_norm.weight": "blk.{}.attn_k_norm.weight",
}
MLP = {
    "model.layers.{}.mlp.gate_proj.weight": "blk.{}.ffn_gate.weight",
    "model.layers.{}.mlp.up_proj.weight": "blk.{}.ffn_up.weight",
    "model.layers.{}.mlp.down_proj.weight": "blk.{}.ffn_down.weight",
}
PRE_NORMS = {
    "model.layers.{}.input_layernorm.weight": "blk.{}.attn_norm.weight",
    "model.layers.{}.post_attention_layernorm.weight": "blk.{}.ffn_norm.weight",
}
# Gemma 2/3: the norm after attention is a real post-norm, and the FFN has its own pre- and post-norms.
SANDWICH_NORMS = {
    "model.layers.{}.input_layernorm.weight": "blk.{}.attn_norm.weight",
    "model.layers.{}.post_attention_layernorm.weight": "blk.{}.post_attention_norm.weight",
    "model.layers.{}.pre_feedforward_layernorm.weight": "blk.{}.ffn_norm.weight",
    "model.layers.{}.post_feedforward_layernorm.weight": "blk.{}.post_ffw_norm.weight",
}


def experts(moe: Any) -> dict[str, str | Split]:
    """The router and expert tensors of a sparse block laid out as ``moe`` (the family's
    :class:`~fasttune.models.spec.MoESpec`, which imports this module) says, in llama.cpp's names: the router
    ``ffn_gate_inp``, the fused gate/up split into ``ffn_gate_exps`` / ``ffn_up_exps``, ``ffn_down_exps``; where the
    experts have biases (``moe.bias``, gpt-oss) the router's and experts' biases too."""
    block = f"model.layers.{{}}.mlp.{moe.experts}."
    names: dict[str, str | Split] = {
        f"model.layers.{{}}.mlp.{moe.router}.weight": "blk.{}.ffn_gate_inp.weight",
        block + moe.gate_up: Split(-2, ("blk.{}.ffn_gate_exps.weight", "blk.{}.ffn_up_exps.weight"),
                                   interleaved=moe.interleaved, transposed=moe.transposed),
        block + moe.down: Split(-2, ("blk.{}.ffn_down_exps.weight",), transposed=moe.transposed),
    }
    if moe.bias:
        names.update({
            f"model.layers.{{}}.mlp.{moe.router}.bias": "blk.{}.ffn_gate_inp.bias",
            block + moe.gate_up + "_bias": Split(-1, ("blk.{}.ffn_gate_exps.bias", "blk.{}.ffn_up_exps.bias"),
                                                 interleaved=moe.interleaved),
            block + moe.down + "_bias": "blk.{}.ffn_down_exps.bias",
        })
    return names
