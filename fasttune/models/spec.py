"""What fasttune needs to know about a model family, as data.

A family file (llama.py, gemma2.py, ...) declares one ``FamilySpec``: the facts the fast path reads (norm kind,
activation, projection names), how the family is written to GGUF (:class:`fasttune.models.gguf.TensorMap`) and how
its tiny random test model and tokenizer are built (:class:`TinySpec`). A vision-language family's file declares a
``VisionSpec`` too: its language tower's ``FamilySpec``, how its rows are packed, its mmproj map
(:class:`fasttune.models.mmproj.MMProjMap`) and its tiny VLM (:class:`TinyVisionSpec`). Generic code (LoRA target
validation, fast forwards, GGUF export, the vision collator, fasttune.tiny) walks the specs instead of special-casing
families. Plain data only: this module imports nothing heavy, so any part of fasttune can ask it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from .gguf import TensorMap
from .mmproj import MMProjMap

NormKind = Literal["rms", "rms_offset"]  # x * w, or Gemma's x * (1 + w)
Activation = Literal["silu", "gelu_tanh", "gelu"]
# How a VLM's rows are packed into one padding-free row: "mrope" (3-D positions computed per conversation), "1d"
# (plain positions); None: they cannot be packed exactly (bidirectional image attention, cross-attention masks).
Packing = Literal["mrope", "1d"] | None


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


# silu(gate) * up, or gpt-oss's clamped (up + 1) * gate * sigmoid(a * gate)
ExpertActivation = Literal["silu", "clamped_swiglu"]


@dataclass(frozen=True)
class MoESpec:
    """How a mixture-of-experts family lays out its sparse blocks (transformers >= 5 stores experts as 3-D tensors).

    A decoder layer's ``mlp`` is the sparse block; its ``router`` child returns ``(logits, top-k weights, top-k
    indices)`` for the flattened tokens, its ``experts`` child holds ``gate_up`` (every expert's gate and up
    projections, ``(E, 2I, H)``) and ``down`` (``(E, H, I)``) as parameters. ``transposed``: stored ``(E, in, out)``
    instead (gpt-oss); ``interleaved``: gate and up alternate along the ``2I`` outputs instead of being its two halves
    (gpt-oss); ``bias``: the experts have ``<name>_bias`` parameters; ``returns_scores``: the block returns
    ``(hidden, router scores)`` instead of the hidden states alone (gpt-oss). ``alpha`` / ``limit`` name the
    experts' attributes holding gpt-oss's activation constants. LoRA on the experts goes through peft's
    ``target_parameters`` (one adapter per expert: ``A`` ``(E * r, in)``, ``B`` ``(out, r * E)``).
    """

    router: str = "gate"
    experts: str = "experts"
    gate_up: str = "gate_up_proj"
    down: str = "down_proj"
    transposed: bool = False
    interleaved: bool = False
    bias: bool = False
    activation: ExpertActivation = "silu"
    returns_scores: bool = False
    alpha: str = "alpha"
    limit: str = "limit"

    def is_block(self, module: Any) -> bool:
        """Whether ``module`` is one of this family's sparse blocks (it holds the router and the experts)."""
        return hasattr(module, self.experts) and hasattr(module, self.router)

    @property
    def parameters(self) -> tuple[str, str]:
        """The experts' 3-D parameters LoRA adapts, as paths inside the sparse block."""
        return (f"{self.experts}.{self.gate_up}", f"{self.experts}.{self.down}")


@dataclass(frozen=True)
class FamilySpec:
    """Architecture facts of one model family, and what the rest of fasttune needs to handle it.

    ``family`` is the family's short name (also its file name and its tiny-model name); ``model_type`` is the
    ``model_type`` of its text causal LM in transformers, the key of the fast path and of the GGUF tensor map.
    Multimodal wrappers whose text tower is this family (``gemma3`` around ``gemma3_text``) are the ``VisionSpec`` of
    their own family; :func:`fasttune.models.get_family` finds this spec from their ``model_type`` too.
    ``attention`` / ``mlp`` list the linear projections inside a decoder layer's ``self_attn`` / ``mlp`` module.
    ``fused_aliases`` maps Unsloth's default LoRA target names onto fused projections (phi3 has one ``qkv_proj`` where
    others have q/k/v), so the default ``target_modules`` works on every family.
    ``fast_path``: :mod:`fasttune.patch` patches this family's models (its fused forwards handle the layout).
    ``moe``: the family's decoder MLPs are (some or all) mixtures of experts laid out as :class:`MoESpec` says; the
    ``mlp`` names then apply to its dense layers, where it has any.
    ``packed_masks``: transformers' backbone of this family builds its attention masks without the position ids
    (gpt-oss in transformers 5.25), so a padding-free row would attend across examples; the fast path builds the
    block-diagonal masks from the restarting position ids and hands them to the backbone.
    """

    family: str
    model_type: str
    name: str
    norm: NormKind = "rms"
    activation: Activation = "silu"
    attention: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    mlp: tuple[str, ...] = ("gate_proj", "up_proj", "down_proj")
    fused_aliases: dict[str, str] = field(default_factory=dict)
    fast_path: bool = True
    gguf: TensorMap | None = None
    text_equivalent: str | None = None  # model_type of a text model computing the same on text (GGUF validation)
    tiny: TinySpec | None = None
    moe: MoESpec | None = None
    packed_masks: bool = False

    @property
    def linear_names(self) -> tuple[str, ...]:
        return self.attention + self.mlp


@dataclass(frozen=True)
class TinyVisionSpec:
    """How :mod:`fasttune.tiny.vision` builds this family's tiny random VLM and its processor, as data.

    ``tokenizer``: the text family whose tiny tokenizer convention (bos/eos/pad) it uses; ``image_markers``: special
    tokens its image placeholders use, added to that tokenizer; ``tokenizer_names``: processor-facing names of
    some of them (``{"image_token": ...}``) the processor reads off the tokenizer, where the released tokenizer has
    them. ``template``: the chat template (:mod:`fasttune.models.tiny_templates`) with ``IMAGE`` where one image goes,
    written as ``image_marker``; ``end_of_turn``: the token the template ends a turn with, where it is not eos
    (generation stops there).
    ``text`` / ``vision``: the text and vision configs' values over the shared tiny text shape; ``config``: the
    wrapper config's own values; ``token_ids``: wrapper config keys set to a marker's token id;
    ``vision_width``: the vision config key that must equal the text width (a merger's output), if any.
    ``processor``: the transformers processor class name; ``image_processor``: the image processor class as
    ``module:Class`` (the PIL backend, no torchvision) with its keyword arguments; ``processor_kwargs``: the
    processor's own keyword arguments.
    """

    tokenizer: FamilySpec
    image_markers: tuple[str, ...]
    template: str
    image_marker: str
    processor: str
    image_processor: tuple[str, dict[str, Any]]
    text: dict[str, Any] = field(default_factory=dict)
    vision: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    token_ids: dict[str, str] = field(default_factory=dict)
    vision_width: str | None = None
    tokenizer_names: dict[str, str] = field(default_factory=dict)
    processor_kwargs: dict[str, Any] = field(default_factory=dict)
    end_of_turn: str | None = None


@dataclass(frozen=True)
class VisionSpec:
    """A vision-language model family: what fasttune needs beyond its language tower's :class:`FamilySpec`.

    ``family`` is its short name (its file name and tiny-VLM name); ``model_type`` the ``model_type`` of the
    multimodal model in transformers (the wrapper's config); ``language`` the family of its text tower, whose fast
    path and GGUF map the language model gets. ``packing``: how the vision collator packs its rows (:data:`Packing`);
    ``mmproj``: how its vision tower and projector are written as llama.cpp's mmproj file (None: no GGUF export).
    ``tower_attention``: the class name of its tower's attention when that attention is Qwen's packed kind (all images'
    patches in one sequence, ``cu_seqlens`` bounds, a fused ``qkv`` and ``proj``, 2-D rotary ``position_embeddings``),
    which :mod:`fasttune.patch.vision_tower` runs per image through :mod:`fasttune.kernels.segment_attention`.
    """

    family: str
    model_type: str
    name: str
    language: FamilySpec
    packing: Packing = None
    mmproj: MMProjMap | None = None
    tiny: TinyVisionSpec | None = None
    tower_attention: str | None = None
