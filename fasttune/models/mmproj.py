"""How a VLM's vision tower and projector are written as llama.cpp's mmproj GGUF, as data.

llama.cpp runs a VLM from two files: the language model (its text family's GGUF, see :mod:`fasttune.models.gguf`)
and a "multimodal projector" file (architecture ``clip``) read by its ``mtmd`` library (``tools/mtmd/clip.cpp``).
An :class:`MMProjMap` names each vision tensor's GGUF name (``{}`` = the layer index), how its values change on the
way, and where the header's sizes are found in the family's vision config (families name them their own way); the
writer (:mod:`fasttune.export.gguf.mmproj`) walks the map and never branches on a family. The name blocks below are
shared by the family files.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from .gguf import Split  # one tensor written as several (shared with the text maps)


@dataclass(frozen=True)
class MMProjMap:
    """How one family's vision tower and projector are written as an mmproj file.

    ``projector_type`` is llama.cpp's name of the projector (``clip.projector_type``). Tensor names are relative to
    ``tower_prefix`` (and ``projector_prefix`` for a projector outside the tower). The header's sizes are read from
    the vision config's ``width`` / ``depth`` / ``heads`` keys, ``feed_forward`` is the product of its keys, and
    ``layer_norm_eps`` is a key or a fixed value. Extra header keys: ``window_attention`` (every n-th block attends
    fully: ``n_wa_pattern`` from ``fullatt_block_indexes``), ``spatial_merge`` (``spatial_merge_size``),
    ``pooled_tokens`` (the projector pools patches down to ``mm_tokens_per_image``: ``projector.scale_factor``).
    """

    projector_type: str
    tower_prefix: str
    names: dict[str, str | Split]  # tower-relative name ({} = layer) -> GGUF name(s)
    projector_prefix: str = ""  # a projector outside the tower ("" = none)
    projector_names: dict[str, str | Split] = field(default_factory=dict)
    offset_norms: tuple[str, ...] = ()  # GGUF names whose weight is stored as 1 + w (Gemma's RMSNorm)
    keep_f32: tuple[str, ...] = ("v.patch_embd.weight", "v.position_embd.weight")
    activation: Literal["gelu", "silu", "quick_gelu"] = "gelu"  # the encoder MLP's (quick_gelu: llama.cpp's default)
    width: str = "hidden_size"
    feed_forward: tuple[str, ...] = ("intermediate_size",)
    depth: str = "num_hidden_layers"
    heads: str = "num_attention_heads"
    layer_norm_eps: str | float = "layer_norm_eps"
    window_attention: bool = False
    spatial_merge: bool = False
    pooled_tokens: bool = False

    @property
    def module_paths(self) -> tuple[str, ...]:
        """The module paths the mmproj file is written from (tower, and projector where it is separate)."""
        return tuple(p.rstrip(".") for p in (self.tower_prefix, self.projector_prefix) if p)


# SigLIP / CLIP encoder names (after the tower's prefix) -> llama.cpp's ``v.*`` names.
SIGLIP_ENCODER: dict[str, str | Split] = {
    "embeddings.patch_embedding.weight": "v.patch_embd.weight",
    "embeddings.patch_embedding.bias": "v.patch_embd.bias",
    "embeddings.position_embedding.weight": "v.position_embd.weight",
    "post_layernorm.weight": "v.post_ln.weight",
    "post_layernorm.bias": "v.post_ln.bias",
    **{f"encoder.layers.{{}}.{hf}.{kind}": f"v.blk.{{}}.{ours}.{kind}"
       for hf, ours in (("layer_norm1", "ln1"), ("layer_norm2", "ln2"), ("self_attn.q_proj", "attn_q"),
                        ("self_attn.k_proj", "attn_k"), ("self_attn.v_proj", "attn_v"),
                        ("self_attn.out_proj", "attn_out"), ("mlp.fc1", "ffn_up"), ("mlp.fc2", "ffn_down"))
       for kind in ("weight", "bias")},
}
