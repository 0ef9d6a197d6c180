"""Per-family maps from transformers tensor names to GGUF tensor names, as data.

``{}`` stands for the layer index. Each ``TensorMap`` also says how a tensor's values change on the way:

- ``permute_qk``: llama.cpp's "llama" architecture applies RoPE to interleaved pairs (x0, x1), (x2, x3), ...
  while transformers' Llama rotates halves (x_i, x_{i + d/2}). The rows of q_proj / k_proj are reordered per head so
  that both compute the same thing: rows ``[h, 2, d/2]`` -> ``[h, d/2, 2]`` (see ``permute_rows``). Families that
  llama.cpp runs with NeoX-style RoPE (qwen2, qwen3, gemma*, phi3) need no permutation.
- ``norm_offset``: Gemma's RMSNorm computes ``x * (1 + w)``; llama.cpp's computes ``x * w``, so ``1`` is added to every
  norm weight (including Gemma 3's q/k norms) when writing.
- ``output_optional``: the architecture falls back to ``token_embd`` when the file has no ``output.weight`` (tied
  embeddings). Gemma 1/2 always use ``token_embd``, so a Gemma model with an untied head cannot be written.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class TensorMap:
    """How one family's tensors are named and transformed in GGUF."""

    arch: str  # gguf architecture name (gguf.MODEL_ARCH_NAMES value)
    names: dict[str, str]  # transformers name (with {} for the layer) -> GGUF name
    permute_qk: bool = False
    norm_offset: float = 0.0
    output_optional: bool = True
    q_name: str = "model.layers.{}.self_attn.q_proj.weight"
    k_name: str = "model.layers.{}.self_attn.k_proj.weight"


_GLOBAL = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_ATTN = {
    "model.layers.{}.self_attn.q_proj.weight": "blk.{}.attn_q.weight",
    "model.layers.{}.self_attn.k_proj.weight": "blk.{}.attn_k.weight",
    "model.layers.{}.self_attn.v_proj.weight": "blk.{}.attn_v.weight",
    "model.layers.{}.self_attn.o_proj.weight": "blk.{}.attn_output.weight",
}
_ATTN_BIAS = {
    "model.layers.{}.self_attn.q_proj.bias": "blk.{}.attn_q.bias",
    "model.layers.{}.self_attn.k_proj.bias": "blk.{}.attn_k.bias",
    "model.layers.{}.self_attn.v_proj.bias": "blk.{}.attn_v.bias",
}
_QK_NORM = {
    "model.layers.{}.self_attn.q_norm.weight": "blk.{}.attn_q_norm.weight",
    "model.layers.{}.self_attn.k_norm.weight": "blk.{}.attn_k_norm.weight",
}
_MLP = {
    "model.layers.{}.mlp.gate_proj.weight": "blk.{}.ffn_gate.weight",
    "model.layers.{}.mlp.up_proj.weight": "blk.{}.ffn_up.weight",
    "model.layers.{}.mlp.down_proj.weight": "blk.{}.ffn_down.weight",
}
_PRE_NORMS = {
    "model.layers.{}.input_layernorm.weight": "blk.{}.attn_norm.weight",
    "model.layers.{}.post_attention_layernorm.weight": "blk.{}.ffn_norm.weight",
}
# Gemma 2/3: the norm after attention is a real post-norm, and the FFN has its own pre- and post-norms.
_SANDWICH_NORMS = {
    "model.layers.{}.input_layernorm.weight": "blk.{}.attn_norm.weight",
    "model.layers.{}.post_attention_layernorm.weight": "blk.{}.post_attention_norm.weight",
    "model.layers.{}.pre_feedforward_layernorm.weight": "blk.{}.ffn_norm.weight",
    "model.layers.{}.post_feedforward_layernorm.weight": "blk.{}.post_ffw_norm.weight",
}
_PHI3 = {
    "model.layers.{}.self_attn.qkv_proj.weight": "blk.{}.attn_qkv.weight",
    "model.layers.{}.self_attn.o_proj.weight": "blk.{}.attn_output.weight",
    "model.layers.{}.mlp.gate_up_proj.weight": "blk.{}.ffn_up.weight",  # llama.cpp splits gate|up itself
    "model.layers.{}.mlp.down_proj.weight": "blk.{}.ffn_down.weight",
}

TENSOR_MAPS: dict[str, TensorMap] = {
    "llama": TensorMap("llama", {**_GLOBAL, **_ATTN, **_MLP, **_PRE_NORMS}, permute_qk=True),
    "mistral": TensorMap("llama", {**_GLOBAL, **_ATTN, **_MLP, **_PRE_NORMS}, permute_qk=True),
    "qwen2": TensorMap("qwen2", {**_GLOBAL, **_ATTN, **_ATTN_BIAS, **_MLP, **_PRE_NORMS}),
    "qwen3": TensorMap("qwen3", {**_GLOBAL, **_ATTN, **_QK_NORM, **_MLP, **_PRE_NORMS}),
    "gemma": TensorMap("gemma", {**_GLOBAL, **_ATTN, **_MLP, **_PRE_NORMS}, norm_offset=1.0, output_optional=False),
    "gemma2": TensorMap("gemma2", {**_GLOBAL, **_ATTN, **_MLP, **_SANDWICH_NORMS}, norm_offset=1.0,
                        output_optional=False),
    "gemma3_text": TensorMap("gemma3", {**_GLOBAL, **_ATTN, **_QK_NORM, **_MLP, **_SANDWICH_NORMS}, norm_offset=1.0),
    "phi3": TensorMap("phi3", {**_GLOBAL, **_PHI3, **_PRE_NORMS}),
}

_LAYER_INDEX = re.compile(r"^(model\.layers\.)(\d+)(\..+)$")


def get_tensor_map(model_type: str) -> TensorMap:
    """The map of a transformers ``model_type``; an error lists the supported ones."""
    if model_type not in TENSOR_MAPS:
        raise ValueError(
            f"model_type: {model_type!r} has no GGUF tensor map in fasttune; supported: {sorted(TENSOR_MAPS)}"
        )
    return TENSOR_MAPS[model_type]


def gguf_name(tmap: TensorMap, hf_name: str) -> tuple[str, str, int | None]:
    """``(key, gguf_name, layer)``: ``("model.layers.{}.self_attn.q_proj.weight", "blk.3.attn_q.weight", 3)`` for
    ``"model.layers.3.self_attn.q_proj.weight"``; layer is None for global tensors.

    Raises ``KeyError`` naming the tensor when the map has no entry (a tensor is never dropped silently).
    """
    match = _LAYER_INDEX.match(hf_name)
    key, layer = (f"{match[1]}{{}}{match[3]}", int(match[2])) if match else (hf_name, None)
    if key not in tmap.names:
        raise KeyError(f"tensor {hf_name!r} has no GGUF name in the {tmap.arch} tensor map (looked up {key!r})")
    target = tmap.names[key]
    return key, (target.format(layer) if layer is not None else target), layer


def permute_rows(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Reorder the rows of a q/k projection (rows = n_heads * head_dim) from rotate-half to interleaved RoPE order.

    Within each head, row ``j`` of the first half goes to ``2j`` and row ``j`` of the second half to ``2j + 1``:
    ``(n_heads, 2, head_dim / 2, ...) -> (n_heads, head_dim / 2, 2, ...)``. Works for weights (rows, in) and
    biases (rows,).
    """
    rows = weight.shape[0]
    if rows % (2 * n_heads) != 0:
        raise ValueError(f"permute_rows: {rows} rows cannot be split into {n_heads} heads of even size")
    head_dim = rows // n_heads
    rest = weight.shape[1:]
    return weight.reshape(n_heads, 2, head_dim // 2, *rest).swapaxes(1, 2).reshape(weight.shape)


def is_norm(hf_name: str) -> bool:
    """True for RMSNorm weights (the ones Gemma's ``norm_offset`` applies to)."""
    return hf_name.endswith("norm.weight")
