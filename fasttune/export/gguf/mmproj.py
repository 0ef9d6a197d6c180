"""GGUF export of vision-language models: the language model as usual, the vision tower + projector as ``mmproj``.

llama.cpp runs a VLM from two files: the language model (the family's text architecture, e.g. ``gemma3``) and a
"multimodal projector" file (architecture ``clip``) holding the vision encoder and the projector, read by its ``mtmd``
library. :func:`language_tensors` renames the language tower's merged tensors to the text model's names (so the text
writer and tensor map are reused unchanged); :func:`write_mmproj` writes the vision part.

Supported: every vision-language family whose ``VisionSpec`` in :mod:`fasttune.models` has an mmproj map
(:class:`fasttune.models.mmproj.MMProjMap`: tensor names, splits, norm offsets and where the header's sizes are);
this module walks the map and never branches on a family. The tensor names and keys follow llama.cpp's mtmd loader
(``tools/mtmd/clip.cpp``); weights are stored as transformers holds them (ggml's row-major reading of a ``(out, in)``
matrix is what its matmul wants).
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFWriter

from fasttune.models import MMProjMap, Split, get_vision_family, vision_families

from .tensor_maps import split_tensor
from .writer import GGUFReport, gguf_file

logger = logging.getLogger(__name__)

LANGUAGE_PREFIX = "model.language_model."
LANGUAGE_PATHS = ("model.language_model", "lm_head")  # the modules the language-model file is written from

_LAYER = re.compile(r"\.(\d+)\.")


def mmproj_map(config: Any) -> MMProjMap:
    """The mmproj map of a VLM config (its family's, in :mod:`fasttune.models`); an error names the supported ones."""
    vision = get_vision_family(config.model_type)
    if vision is None or vision.mmproj is None:
        supported = sorted(v.model_type for v in vision_families() if v.mmproj is not None)
        raise ValueError(f"model_type: {config.model_type!r} has no mmproj export in fasttune yet (llama.cpp's vision "
                         f"projector file); supported: {supported}. Export merged_16bit instead")
    return vision.mmproj


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
        parts = split_tensor(target, data) if isinstance(target, Split) else [(target, data)]
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
    if mmap.window_attention:
        writer.add_uint32("clip.vision.n_wa_pattern", _window_pattern(v.fullatt_block_indexes))
    if mmap.spatial_merge:
        writer.add_uint32("clip.vision.spatial_merge_size", int(v.spatial_merge_size))
    eps = mmap.layer_norm_eps if isinstance(mmap.layer_norm_eps, float) else getattr(v, mmap.layer_norm_eps)
    writer.add_uint32("clip.vision.image_size", image_side(config, processor))  # Qwen: read, unused (any size)
    writer.add_uint32("clip.vision.patch_size", int(v.patch_size))
    writer.add_uint32("clip.vision.embedding_length", int(getattr(v, mmap.width)))
    writer.add_uint32("clip.vision.feed_forward_length", int(math.prod(getattr(v, k) for k in mmap.feed_forward)))
    writer.add_uint32("clip.vision.block_count", int(getattr(v, mmap.depth)))
    writer.add_uint32("clip.vision.attention.head_count", int(getattr(v, mmap.heads)))
    writer.add_float32("clip.vision.attention.layer_norm_epsilon", float(eps))
    writer.add_uint32("clip.vision.projection_dim", int(config.get_text_config().hidden_size))
    mean, std = _image_stats(processor)
    writer.add_array("clip.vision.image_mean", mean)
    writer.add_array("clip.vision.image_std", std)
    if mmap.activation == "gelu":  # SigLIP's gelu_pytorch_tanh is ggml_gelu (the tanh form)
        writer.add_bool("clip.use_gelu", True)
    elif mmap.activation == "silu":
        writer.add_bool("clip.use_silu", True)
    if mmap.pooled_tokens:
        patches_per_side = v.image_size // v.patch_size
        tokens_per_side = int(round(config.mm_tokens_per_image ** 0.5))
        writer.add_uint32("clip.vision.projector.scale_factor", patches_per_side // tokens_per_side)


def write_mmproj(path: str | os.PathLike, tensors: Iterable[tuple[str, torch.Tensor]], config: Any, processor: Any,
                 ftype: str = "f16", name: str | None = None, mmap: MMProjMap | None = None) -> GGUFReport:
    """Write the vision tower and projector of a merged VLM as llama.cpp's mmproj GGUF (``ftype`` f16 or f32);
    ``mmap``: the family's map when the caller has it already (else looked up from ``config``)."""
    if ftype not in ("f16", "f32"):
        raise ValueError(f"ftype: {ftype!r} for an mmproj file must be 'f16' or 'f32' (vision encoders are kept in "
                         "16-bit, as llama.cpp's converter does)")
    mmap = mmap if mmap is not None else mmproj_map(config)
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
