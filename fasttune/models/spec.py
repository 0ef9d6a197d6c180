"""What fasttune needs to know about a model family, as data.

A family file (llama.py, gemma2.py, ...) declares one ``FamilySpec``: the facts the fast path reads (norm kind,
activation, projection names), how the family is written to GGUF (:class:`fasttune.models.gguf.TensorMap`) and how
its tiny random test model and tokenizer are built (:class:`TinySpec`). Generic code (LoRA target validation, fast
forwards, GGUF export, fasttune.tiny) walks the spec instead of special-casing families. Plain data only: this module
imports nothing heavy, so any part of fasttune can ask it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from .gguf import TensorMap

NormKind = Literal["rms", "rms_offset"]  # x * w, or Gemma's x * (1 + w)
Activation = Literal["silu", "gelu_tanh", "gelu"]


@dataclass(frozen=True)
class SpecialTokens:
    """The bos/eos/pad/unk convention of one model family (None = the family has no such token)."""

    bos: str | None
    eos: str
    pad: str
    unk: str | None = None
    add_bos: bool = True


@dataclass(frozen=True)
class TinySpec:
    """How :mod:`fasttune.tiny` builds this family's tiny random model and offline tokenizer.

    ``config`` overrides the shared tiny shape (hidden 256, 4 layers, ...) with what the family's real checkpoints
    set (tied embeddings, softcapping, window sizes); ``drop`` names shared keys the family's config must not get
    (phi3 derives ``head_dim`` from hidden / heads). ``tokens`` is the family's special-token convention.
    """

    tokens: SpecialTokens
    config: dict[str, Any] = field(default_factory=dict)
    drop: tuple[str, ...] = ()


@dataclass(frozen=True)
class FamilySpec:
    """Architecture facts of one model family, and what the rest of fasttune needs to handle it.

    ``family`` is the family's short name (also its file name and its tiny-model name); ``model_type`` is the
    ``model_type`` of its text causal LM in transformers, the key of the fast path and of the GGUF tensor map;
    ``wrapper_model_types`` are multimodal wrappers whose text tower is this family (``gemma3`` around
    ``gemma3_text``), so that :func:`fasttune.models.get_family` knows them too.
    ``attention`` / ``mlp`` list the linear projections inside a decoder layer's ``self_attn`` / ``mlp`` module.
    ``fused_aliases`` maps Unsloth's default LoRA target names onto fused projections (phi3 has one ``qkv_proj`` where
    others have q/k/v), so the default ``target_modules`` works on every family.
    ``fast_path``: :mod:`fasttune.patch` patches this family's models (its fused forwards handle the layout).
    """

    family: str
    model_type: str
    name: str
    norm: NormKind = "rms"
    activation: Activation = "silu"
    attention: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    mlp: tuple[str, ...] = ("gate_proj", "up_proj", "down_proj")
    fused_aliases: dict[str, str] = field(default_factory=dict)
    wrapper_model_types: tuple[str, ...] = ()
    fast_path: bool = True
    gguf: TensorMap | None = None
    text_equivalent: str | None = None  # model_type of a text model computing the same on text (GGUF validation)
    tiny: TinySpec | None = None

    @property
    def linear_names(self) -> tuple[str, ...]:
        return self.attention + self.mlp

    @property
    def model_types(self) -> tuple[str, ...]:
        """Every ``model_type`` this family covers: the text model's first, then wrappers'."""
        return (self.model_type, *self.wrapper_model_types)
