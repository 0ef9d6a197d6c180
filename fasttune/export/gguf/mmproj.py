"""GGUF export of vision-language models: the language model as usual, the vision tower + projector as ``mmproj``.

llama.cpp runs a VLM from two files: the language model (the family's text architecture, e.g. ``gemma3``) and a
"multimodal projector" file (architecture ``clip``) holding the vision encoder and the projector, read by its ``mtmd``
library. :func:`language_tensors` renames the language tower's merged tensors to the text model's names (so the text
writer and tensor map are reused unchanged); :func:`write_mmproj` writes the vision part.

Supported: Gemma 3 (SigLIP encoder, average-pool + RMS-norm + linear projector: llama.cpp projector ``gemma3``) and
Qwen2-VL (ViT with 2-D RoPE and quick-GELU, 2x2 patch merger: ``qwen2vl_merger``; its fused ``qkv`` is split into
q/k/v and its two-frame patch kernel into two 2-D kernels, as llama.cpp's graph wants) and Qwen2.5-VL (the same with
RMS norms, a gated SiLU MLP and window attention: ``qwen2.5vl_merger``). The tensor names and keys
follow llama.cpp's mtmd loader (``tools/mtmd/clip.cpp``); weights are stored as transformers holds them (ggml's
row-major reading of a ``(out, in)`` matrix is what its matmul wants).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFWriter

from .writer import GGUFReport, gguf_file

logger = logging.getLogger(__name__)

LANGUAGE_PREFIX = "model.language_model."
LANGUAGE_PATHS = ("model.language_model", "lm_head")  # the modules the language-model file is written from

# SigLIP / CLIP encoder names (after the tower's prefix) -> llama.cpp's ``v.*`` names; {} is the layer index.
_ENCODER: dict[str, str] = {
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


@dataclass(frozen=True)
class Split:
    """One transformers tensor written as several GGUF tensors: equal chunks along ``dim`` (or index ``dim`` when
    ``squeeze``), named in order."""

    dim: int
    names: tuple[str, ...]
    squeeze: bool = False

    def apply(self, data: np.ndarray) -> list[tuple[str, np.ndarray]]:
        if self.squeeze:
            return [(name, np.take(data, i, axis=self.dim)) for i, name in enumerate(self.names)]
        return list(zip(self.names, np.split(data, len(self.names), axis=self.dim)))


_QWEN2VL_TOWER: dict[str, str | Split] = {
    "patch_embed.proj.weight": Split(2, ("v.patch_embd.weight", "v.patch_embd.weight.1"), squeeze=True),
    "merger.ln_q.weight": "v.post_ln.weight",
    "merger.ln_q.bias": "v.post_ln.bias",
    "merger.mlp.0.weight": "mm.0.weight",
    "merger.mlp.0.bias": "mm.0.bias",
    "merger.mlp.2.weight": "mm.2.weight",
    "merger.mlp.2.bias": "mm.2.bias",
    **{f"blocks.{{}}.{hf}.{kind}": f"v.blk.{{}}.{ours}.{kind}"
       for hf, ours in (("norm1", "ln1"), ("norm2", "ln2"), ("attn.proj", "attn_out"), ("mlp.fc1", "ffn_up"),
                        ("mlp.fc2", "ffn_down"))
       for kind in ("weight", "bias")},
    **{f"blocks.{{}}.attn.qkv.{kind}": Split(0, tuple(f"v.blk.{{}}.attn_{x}.{kind}" for x in "qkv"))
       for kind in ("weight", "bias")},
}


_QWEN25VL_TOWER: dict[str, str | Split] = {
    **{k: v for k, v in _QWEN2VL_TOWER.items() if "norm" not in k and "mlp.fc" not in k and "ln_q.bias" not in k},
    **{f"blocks.{{}}.{hf}.weight": f"v.blk.{{}}.{ours}.weight" for hf, ours in (("norm1", "ln1"), ("norm2", "ln2"))},
    **{f"blocks.{{}}.mlp.{hf}_proj.{kind}": f"v.blk.{{}}.ffn_{hf}.{kind}"
       for hf in ("gate", "up", "down") for kind in ("weight", "bias")},
}


@dataclass(frozen=True)
class MMProjMap:
    """How one family's vision tower and projector are written as an mmproj file."""

    projector_type: str
    tower_prefix: str
    names: dict[str, str | Split]  # tower-relative name ({} = layer) -> GGUF name(s)
    projector_prefix: str = ""  # a projector outside the tower ("" = none)
    projector_names: dict[str, str | Split] = field(default_factory=dict)
    offset_norms: tuple[str, ...] = ()  # GGUF names whose weight is stored as 1 + w (Gemma's RMSNorm)
    keep_f32: tuple[str, ...] = ("v.patch_embd.weight", "v.position_embd.weight")
    activation: str = "gelu"  # the encoder MLP's: gelu (tanh form), silu, or quick_gelu (llama.cpp's default)

    @property
    def module_paths(self) -> tuple[str, ...]:
        """The module paths the mmproj file is written from (tower, and projector where it is separate)."""
        return tuple(p.rstrip(".") for p in (self.tower_prefix, self.projector_prefix) if p)


MMPROJ_MAPS: dict[str, MMProjMap] = {
    "gemma3": MMProjMap(
        projector_type="gemma3",
        tower_prefix="model.vision_tower.",
        names=_ENCODER,
        projector_prefix="model.multi_modal_projector.",
        projector_names={"mm_input_projection_weight": "mm.input_projection.weight",
                         "mm_soft_emb_norm.weight": "mm.soft_emb_norm.weight"},
        offset_norms=("mm.soft_emb_norm.weight",),
    ),
    "qwen2_vl": MMProjMap(
        projector_type="qwen2vl_merger",
        tower_prefix="model.visual.",
        names=_QWEN2VL_TOWER,
        keep_f32=(),
        activation="quick_gelu",
    ),
    "qwen2_5_vl": MMProjMap(  # RMS norms, a gated SiLU MLP, window attention in all but every n-th block
        projector_type="qwen2.5vl_merger",
        tower_prefix="model.visual.",
        names=_QWEN25VL_TOWER,
        keep_f32=(),
        activation="silu",
    ),
}

_LAYER = re.compile(r"\.(\d+)\.")


def mmproj_map(config: Any) -> MMProjMap:
    """The mmproj map of a VLM config; an error names the supported families."""
    if config.model_type not in MMPROJ_MAPS:
        raise ValueError(f"model_type: {config.model_type!r} has no mmproj export in fasttune yet (llama.cpp's vision "
                         f"projector file); supported: {sorted(MMPROJ_MAPS)}. Export merged_16bit instead")
    return MMPROJ_MAPS[config.model_type]


def language_tensors(tensors: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """The language tower's tensors under the text model's names (``model.layers.0...``, ``lm_head.weight``)."""
    for name, tensor in tensors:
        if name.startswith(LANGUAGE_PREFIX):
            yield "model." + name[len(LANGUAGE_PREFIX):], tensor
        elif name == "lm_head.weight":
            yield name, tensor


def _entries(mmap: MMProjMap, name: str, data: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """The GGUF tensors a merged tensor of the vision part becomes ([] for a tensor outside it); KeyError for a
    tensor of the vision part that the map does not name (never dropped silently)."""
    for prefix, table in ((mmap.tower_prefix, mmap.names), (mmap.projector_prefix, mmap.projector_names)):
        if not prefix or not name.startswith(prefix):
            continue
        rest = name[len(prefix):]
        match = None if rest in table else _LAYER.search(rest)  # "merger.mlp.0.weight" is a name, not a layer
        key = _LAYER.sub(".{}.", rest, count=1) if match else rest
        if key not in table:
            raise KeyError(f"tensor {name!r} has no name in the {mmap.projector_type} mmproj map (looked up {key!r})")
        target = table[key]
        parts = target.apply(data) if isinstance(target, Split) else [(target, data)]
        return [(n.format(int(match[1])) if match else n, np.ascontiguousarray(d)) for n, d in parts]
    return []


def _image_stats(processor: Any) -> tuple[list[float], list[float]]:
    image_processor = getattr(processor, "image_processor", processor)
    mean, std = getattr(image_processor, "image_mean", None), getattr(image_processor, "image_std", None)
    if mean is None or std is None:
        raise ValueError("processor: its image processor has no image_mean/image_std; the mmproj file needs them")
    return [float(v) for v in mean], [float(v) for v in std]


def _window_pattern(full_blocks: list[int]) -> int:
    """llama.cpp's ``n_wa_pattern``: every n-th block attends fully; it cannot express an irregular pattern."""
    pattern = full_blocks[0] + 1
    if any(b - a != pattern for a, b in zip(full_blocks, full_blocks[1:])):
        raise ValueError(f"fullatt_block_indexes: {full_blocks} is not every n-th block, which is all llama.cpp's "
                         "mmproj can express")
    return pattern


def image_side(config: Any, processor: Any) -> int:
    """The image side (pixels) the vision tower is fed without resizing: its fixed size, or for Qwen2-VL (any size)
    the largest square the processor's pixel budget keeps as it is, rounded down to whole merged patches."""
    v = config.vision_config
    if getattr(v, "image_size", None):
        return int(v.image_size)
    image_processor = getattr(processor, "image_processor", processor)
    budget = float(getattr(image_processor, "max_pixels", None) or 14 * 14 * 4 * 1280)
    unit = int(v.patch_size) * int(v.spatial_merge_size)
    return max(unit, int(budget ** 0.5) // unit * unit)


def write_mmproj_hparams(writer: GGUFWriter, config: Any, mmap: MMProjMap, processor: Any) -> None:
    v = config.vision_config
    writer.add_bool("clip.has_vision_encoder", True)
    writer.add_string("clip.projector_type", mmap.projector_type)
    if mmap.projector_type in ("qwen2vl_merger", "qwen2.5vl_merger"):  # Qwen's vision configs name sizes their way
        if mmap.projector_type == "qwen2vl_merger":
            width, ff = v.embed_dim, int(v.embed_dim * v.mlp_ratio)
        else:
            width, ff = v.hidden_size, v.intermediate_size
            writer.add_uint32("clip.vision.n_wa_pattern", _window_pattern(v.fullatt_block_indexes))
        depth, heads, eps = v.depth, v.num_heads, 1e-6
        writer.add_uint32("clip.vision.spatial_merge_size", int(v.spatial_merge_size))
    else:
        width, ff, depth = v.hidden_size, v.intermediate_size, v.num_hidden_layers
        heads, eps = v.num_attention_heads, v.layer_norm_eps
    writer.add_uint32("clip.vision.image_size", image_side(config, processor))  # Qwen: read, unused (any size)
    writer.add_uint32("clip.vision.patch_size", int(v.patch_size))
    writer.add_uint32("clip.vision.embedding_length", int(width))
    writer.add_uint32("clip.vision.feed_forward_length", int(ff))
    writer.add_uint32("clip.vision.block_count", int(depth))
    writer.add_uint32("clip.vision.attention.head_count", int(heads))
    writer.add_float32("clip.vision.attention.layer_norm_epsilon", float(eps))
    writer.add_uint32("clip.vision.projection_dim", int(config.get_text_config().hidden_size))
    mean, std = _image_stats(processor)
    writer.add_array("clip.vision.image_mean", mean)
    writer.add_array("clip.vision.image_std", std)
    if mmap.activation == "gelu":  # SigLIP's gelu_pytorch_tanh is ggml_gelu (the tanh form)
        writer.add_bool("clip.use_gelu", True)
    elif mmap.activation == "silu":
        writer.add_bool("clip.use_silu", True)
    if mmap.projector_type == "gemma3":
        patches_per_side = v.image_size // v.patch_size
        tokens_per_side = int(round(config.mm_tokens_per_image ** 0.5))
        writer.add_uint32("clip.vision.projector.scale_factor", patches_per_side // tokens_per_side)


def write_mmproj(path: str | os.PathLike, tensors: Iterable[tuple[str, torch.Tensor]], config: Any, processor: Any,
                 ftype: str = "f16", name: str | None = None) -> GGUFReport:
    """Write the vision tower and projector of a merged VLM as llama.cpp's mmproj GGUF (``ftype`` f16 or f32)."""
    if ftype not in ("f16", "f32"):
        raise ValueError(f"ftype: {ftype!r} for an mmproj file must be 'f16' or 'f32' (vision encoders are kept in "
                         "16-bit, as llama.cpp's converter does)")
    mmap = mmproj_map(config)
    report = GGUFReport(Path(path), ftype)
    with gguf_file(path, "clip") as writer:
        writer.add_name(name or "mmproj")
        writer.add_file_type(1 if ftype == "f16" else 0)
        write_mmproj_hparams(writer, config, mmap, processor)
        for hf_name, tensor in tensors:
            for gname, data in _entries(mmap, hf_name, tensor.detach().to(torch.float32, copy=True).cpu().numpy()):
                if gname in mmap.offset_norms:
                    data = data + 1.0
                half = ftype == "f16" and data.ndim >= 2 and gname not in mmap.keep_f32
                data = data.astype(np.float16 if half else np.float32)
                qtype = GGMLQuantizationType.F16 if half else GGMLQuantizationType.F32
                writer.add_tensor(gname, data, raw_dtype=qtype)
                report.tensor_types[gname] = qtype.name
    logger.info("gguf: wrote %s (mmproj %s, %d tensors)", path, ftype, len(report.tensor_types))
    return report
