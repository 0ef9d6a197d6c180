"""What fasttune needs to know about a model family, as data.

A family file (llama.py, gemma2.py, ...) declares one ``FamilySpec``; generic code (LoRA target validation, fast
forwards, export) walks the spec instead of special-casing families.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

NormKind = Literal["rms", "rms_offset"]  # x * w, or Gemma's x * (1 + w)
Activation = Literal["silu", "gelu_tanh", "gelu"]


@dataclass(frozen=True)
class FamilySpec:
    """Architecture facts of one model family.

    ``attention`` / ``mlp`` list the linear projections inside a decoder layer's ``self_attn`` / ``mlp`` module.
    ``fused_aliases`` maps Unsloth's default LoRA target names onto fused projections (phi3 has one ``qkv_proj`` where
    others have q/k/v), so the default ``target_modules`` works on every family.
    """

    model_type: str
    name: str
    norm: NormKind = "rms"
    activation: Activation = "silu"
    attention: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    mlp: tuple[str, ...] = ("gate_proj", "up_proj", "down_proj")
    fused_aliases: dict[str, str] = field(default_factory=dict)
    qk_norm: bool = False  # per-head RMSNorm on q and k (qwen3, gemma3)
    embed_scale: bool = False  # embeddings multiplied by sqrt(hidden) (gemma family)
    softcapping: bool = False  # attention / final logit tanh softcapping (gemma2)
    sliding_window: bool = False  # some or all layers use a local window
    sandwich_norms: bool = False  # extra post-attention / post-feedforward norms (gemma2, gemma3)

    @property
    def linear_names(self) -> tuple[str, ...]:
        return self.attention + self.mlp
