"""Write a merged state dict as one GGUF file of a given type (f16, q8_0, q4_k_m, ...), with ``gguf.GGUFWriter``.

    write_gguf(path, state, config, tokenizer, "q4_k_m")

Tensors are renamed with the family's ``TensorMap``, transformed (llama's q/k row permutation, Gemma's norm offset),
cut where the map has a ``Split`` (a MoE block's fused gate/up experts become ``ffn_gate_exps`` and ``ffn_up_exps``),
given the type llama.cpp's mix would choose (``mixes.choose_tensor_qtype``: shapes a type cannot hold fall back and
the log says so) and quantized in numpy. Hyper-parameters go to the ``<arch>.*`` keys llama.cpp reads.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGML_QUANT_VERSION, GGMLQuantizationType, GGUFWriter, RopeScalingType

from ..atomic import atomic_file
from .mixes import FileType, TensorTypeChoice, choose_tensor_qtype, file_type
from .quants import quantize
from .tensor_maps import Split, TensorMap, get_tensor_map, gguf_name, is_norm, permute_rows, split_tensor
from .tokenizer import build_vocab

logger = logging.getLogger(__name__)


@dataclass
class GGUFReport:
    """What was written: the file, its type, each tensor's GGUF type, and every fallback (with its reason)."""

    path: Path
    ftype: str
    tensor_types: dict[str, str] = field(default_factory=dict)
    fallbacks: list[str] = field(default_factory=list)


def text_config(config: Any) -> Any:
    """The language-model config (``text_config`` of a multimodal wrapper, else the config itself)."""
    return getattr(config, "text_config", None) or config


def reference_text_config(config: Any) -> Any:
    """A config ``AutoModelForCausalLM`` builds that computes what ``config``'s language model computes on text: the
    text config itself, or its family's ``text_equivalent`` (Qwen2-VL's tower on text is Qwen2)."""
    from transformers import AutoConfig

    from fasttune.models import get_family

    c = text_config(config)
    spec = get_family(c.model_type)
    if spec is None or spec.text_equivalent is None:
        return c
    fields = {k: v for k, v in c.to_dict().items() if k not in ("model_type", "architectures", "transformers_version")}
    rope = dict(_rope(c))
    rope.pop("mrope_section", None)
    if rope.get("rope_type", rope.get("type")) == "mrope":
        rope["rope_type"] = "default"
        rope.pop("type", None)
    fields["rope_parameters"] = rope
    return AutoConfig.for_model(spec.text_equivalent, **fields)


def _rope(config: Any, layer_type: str | None = None) -> dict[str, Any]:
    """rope parameters as a dict (transformers 5 ``rope_parameters``, per layer type where it is nested)."""
    params = getattr(config, "rope_parameters", None)
    if params is None:
        params = dict(getattr(config, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    if layer_type is not None and layer_type in params:
        params = params[layer_type]
    elif "full_attention" in params:
        params = params["full_attention"]
    return dict(params)


def _llama3_rope_factors(params: dict[str, Any], head_dim: int) -> np.ndarray:
    """Per-frequency divisors of Llama 3.1 RoPE scaling ("rope_freqs.weight", (head_dim / 2,))."""
    base, factor = float(params["rope_theta"]), float(params["factor"])
    low, high = float(params.get("low_freq_factor", 1.0)), float(params.get("high_freq_factor", 4.0))
    old_ctx = float(params["original_max_position_embeddings"])
    freqs = base ** -(np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / freqs
    smooth = np.clip((old_ctx / wavelen - low) / (high - low), 0.0, 1.0)
    factors = 1.0 / ((1 - smooth) / factor + smooth)
    return factors.astype(np.float32)


def _layer_is_swa(config: Any) -> list[bool] | None:
    types = getattr(config, "layer_types", None)
    if not types or getattr(config, "sliding_window", None) is None:
        return None
    return [t == "sliding_attention" for t in types]


def write_hparams(writer: GGUFWriter, config: Any, tmap: TensorMap, n_vocab: int) -> dict[str, np.ndarray]:
    """Add the ``<arch>.*`` keys; return extra tensors some settings need (``rope_freqs.weight``)."""
    c = text_config(config)
    n_heads = c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // n_heads
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(n_heads)
    writer.add_head_count_kv(getattr(c, "num_key_value_heads", None) or n_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_vocab_size(n_vocab)
    rope = _rope(c)
    writer.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
    writer.add_rope_dimension_count(int(head_dim * float(rope.get("partial_rotary_factor", 1.0))))
    extra: dict[str, np.ndarray] = {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "linear":
        writer.add_rope_scaling_type(RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    elif kind == "llama3":
        extra["rope_freqs.weight"] = _llama3_rope_factors(rope, head_dim)
    elif kind == "yarn":
        _yarn(writer, rope, c)
    elif kind not in ("default", "mrope"):
        raise NotImplementedError(f"rope_type: {kind!r} is not written to GGUF by fasttune yet; supported: "
                                  "default, linear, llama3, yarn")
    _family_hparams(writer, c, tmap)
    return extra


def _yarn(writer: GGUFWriter, rope: dict[str, Any], c: Any) -> None:
    """YaRN context extension: scaling type, factor, original context and any explicit YaRN constants."""
    writer.add_rope_scaling_type(RopeScalingType.YARN)
    writer.add_rope_scaling_factor(float(rope["factor"]))
    writer.add_rope_scaling_orig_ctx_len(int(rope.get("original_max_position_embeddings")
                                             or c.max_position_embeddings))
    if rope.get("attention_factor") is not None:
        writer.add_rope_scaling_yarn_attn_factor(float(rope["attention_factor"]))
    if rope.get("beta_fast") is not None:
        writer.add_rope_scaling_yarn_beta_fast(float(rope["beta_fast"]))
    if rope.get("beta_slow") is not None:
        writer.add_rope_scaling_yarn_beta_slow(float(rope["beta_slow"]))


def _family_hparams(writer: GGUFWriter, c: Any, tmap: TensorMap) -> None:
    """The ``<arch>.*`` keys only some architectures read, chosen by the family's ``TensorMap`` flags.

    Keys are added in one fixed order (softcapping, original context, sliding window, its pattern, the sliding layers'
    RoPE base, the experts): the file's bytes follow the order keys are added in.
    """
    for attr, value in tmap.fixed.items():
        if getattr(c, attr, value) != value:
            raise ValueError(f"config.{attr}: {getattr(c, attr)!r}; llama.cpp's {tmap.arch} architecture always "
                             f"computes with {value!r}, so this model cannot be written to GGUF faithfully")
    if tmap.softcapping == "attn_and_final":
        writer.add_attn_logit_softcapping(float(c.attn_logit_softcapping or 0.0))
        writer.add_final_logit_softcapping(float(c.final_logit_softcapping or 0.0))
    elif tmap.softcapping == "final" and getattr(c, "final_logit_softcapping", None):
        writer.add_final_logit_softcapping(float(c.final_logit_softcapping))
    if tmap.rope_orig_ctx:
        writer.add_rope_scaling_orig_ctx_len(int(getattr(c, "original_max_position_embeddings", None)
                                                 or c.max_position_embeddings))
    if tmap.rope_sections:  # llama.cpp reads four sections (time, height, width, unused)
        sections = [int(v) for v in _rope(c)["mrope_section"]]
        writer.add_rope_dimension_sections(sections + [0] * (4 - len(sections)))
    _sliding_window(writer, c, tmap)
    if tmap.moe:
        writer.add_expert_count(n_experts(c))
        writer.add_expert_used_count(int(c.num_experts_per_tok))
        if tmap.expert_width is not None:
            writer.add_expert_feed_forward_length(int(getattr(c, tmap.expert_width)))


def n_experts(config: Any) -> int:
    """Experts per sparse block (0 for a dense model); transformers names it num_local_experts or num_experts."""
    c = text_config(config)
    return int(getattr(c, "num_local_experts", None) or getattr(c, "num_experts", None) or 0)


def _sliding_window(writer: GGUFWriter, c: Any, tmap: TensorMap) -> None:
    """``config.sliding_window`` as the architecture takes it (``TensorMap.sliding_window``), or a warning."""
    window = getattr(c, "sliding_window", None)
    if not window:
        return
    if tmap.sliding_window == "ignored":
        if getattr(c, "use_sliding_window", True):
            logger.warning("gguf: %s config has sliding_window=%s, which llama.cpp's %s architecture does not "
                           "apply; outputs match only for contexts up to the window", c.model_type, window, tmap.arch)
        return
    writer.add_sliding_window(int(window))
    if tmap.sliding_window == "per_layer":
        swa = _layer_is_swa(c)
        if swa is not None:
            writer.add_sliding_window_pattern(swa)
        if tmap.rope_base_swa:
            writer.add_rope_freq_base_swa(float(_rope(c, "sliding_attention").get("rope_theta", 10000.0)))


def convert_tensor(tmap: TensorMap, key: str, hf_name: str, tensor: torch.Tensor, config: Any) -> np.ndarray:
    """The float32 numpy array GGUF stores for one transformers tensor (permuted / offset as the family needs).

    Always a copy: a numpy array over a model's own parameter would pin that storage (numpy makes it non-resizable),
    and FSDP2 frees the gathered weights after an export by resizing their storage (``fasttune.distributed``).
    """
    data = tensor.detach().to(torch.float32, copy=True).cpu().numpy()
    c = text_config(config)
    if tmap.permute_qk and key == tmap.q_name:
        data = permute_rows(data, c.num_attention_heads)
    elif tmap.permute_qk and key == tmap.k_name:
        data = permute_rows(data, getattr(c, "num_key_value_heads", None) or c.num_attention_heads)
    if tmap.norm_offset and is_norm(hf_name):
        data = data + np.float32(tmap.norm_offset)
    return data


def _ordered(state: Mapping[str, torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
    """A state dict's items in llama.cpp's usual file order: embeddings, blocks by index, then the rest."""
    def rank(name: str) -> int:
        parts = name.split(".")
        if "embed_tokens" in parts:
            return -1
        return int(parts[2]) if len(parts) > 2 and parts[1] == "layers" and parts[2].isdigit() else 10**9

    return sorted(state.items(), key=lambda kv: rank(kv[0]))


def _write_metadata(writer: GGUFWriter, config: Any, tmap: TensorMap, tokenizer: Any, ftype: FileType, template: Any,
                    pre_tokenizer: str | None, name: str | None, report: GGUFReport) -> None:
    """General keys, hyper-parameters, the vocabulary, and extra tensors the config implies (rope_freqs)."""
    c = text_config(config)
    n_vocab = int(c.vocab_size)
    writer.add_name(name or getattr(c, "_name_or_path", "") or c.model_type)
    writer.add_file_type(ftype.llama_ftype)
    writer.add_quantization_version(GGML_QUANT_VERSION)
    extra = write_hparams(writer, config, tmap, n_vocab)
    if tokenizer is not None:
        build_vocab(tokenizer, n_vocab, template, pre_tokenizer).write(writer)
    else:
        logger.warning("gguf: no tokenizer given; %s holds no vocabulary and llama.cpp will not load it",
                       report.path)
    for extra_name, data in extra.items():
        writer.add_tensor(extra_name, data, raw_dtype=GGMLQuantizationType.F32)
        report.tensor_types[extra_name] = "F32"


@contextmanager
def gguf_file(path: str | os.PathLike, arch: str) -> Iterator[GGUFWriter]:
    """A ``GGUFWriter`` for ``arch`` whose file appears at ``path`` atomically: add keys and tensors inside the block;
    on leaving it the header, the keys and the tensors are written (nothing is left behind if the block fails)."""
    with atomic_file(path) as scratch:
        writer = GGUFWriter(str(scratch), arch)
        try:
            yield writer
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()


def tensor_choice(config: Any, gguf_tensor: str, shape: tuple[int, ...], ftype: FileType | str,
                  tied: bool) -> TensorTypeChoice:
    """The type ``write_gguf`` gives the tensor named ``gguf_tensor`` (GGUF name, numpy shape) of a model with
    ``config`` in a file of type ``ftype``: llama.cpp's mix (``mixes.choose_tensor_qtype``) with this model's layer
    count, architecture and GQA ratio. The one place they are read for it (QAT asks here too)."""
    c = text_config(config)
    tmap = get_tensor_map(c.model_type)
    n_kv = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    n_expert = n_experts(c) if tmap.moe else 0  # llama.cpp's quantizer reads hparams.n_expert (0 for dense models)
    return choose_tensor_qtype(gguf_tensor, tuple(shape), ftype, c.num_hidden_layers, n_expert, arch=tmap.arch,
                               n_gqa=c.num_attention_heads // n_kv, tied_embeddings=tied)


def export_qtype(config: Any, hf_name: str, shape: tuple[int, ...], ftype: FileType | str,
                 tied: bool) -> GGMLQuantizationType:
    """The GGUF type ``write_gguf`` writes the transformers tensor ``hf_name`` (``"model.layers.3.mlp.up_proj.weight"``,
    torch shape ``(out, in)``) with in a file of type ``ftype``. Rows are quantized independently, so the q/k row
    permutation ``convert_tensor`` applies does not change which values share a block."""
    _key, gname, _layer = gguf_name(get_tensor_map(text_config(config).model_type), hf_name)
    if isinstance(gname, Split):  # a MoE's fused 3-D experts: several GGUF tensors, which QAT does not cover
        raise ValueError(f"export_qtype: {hf_name} is written as several GGUF tensors ({gname}); the GGUF QAT schemes "
                         "fake-quantize linear layers only")
    return tensor_choice(config, gname, tuple(shape), ftype, tied).qtype


def write_gguf(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
               config: Any, tokenizer: Any, ftype: FileType | str, template: Any = None, pre_tokenizer: str | None = None,
               name: str | None = None, tied: bool | None = None) -> GGUFReport:
    """Write merged transformers tensors as a GGUF file of type ``ftype`` at ``path`` (atomically).

    ``tensors`` is a state dict, or an iterable of ``(name, tensor)`` consumed one at a time (then ``tied`` must say
    whether it leaves out ``lm_head.weight`` because the head shares the input embeddings). ``ftype`` is a
    :class:`~fasttune.export.gguf.mixes.FileType` (``save_pretrained_gguf`` resolves its ``quantization_method`` once
    and passes them down) or a name.
    """
    ftype = file_type(ftype)
    c = text_config(config)
    tmap = get_tensor_map(c.model_type)
    if isinstance(tensors, Mapping):
        tied = "lm_head.weight" not in tensors if tied is None else tied
        tensors = _ordered(tensors)
    elif tied is None:
        raise ValueError("write_gguf: pass tied=True/False when tensors is an iterator")
    if not tied and not tmap.output_optional:
        raise ValueError(f"gguf: {c.model_type} in llama.cpp always uses the input embeddings as its output head, but "
                         "this model has a separate lm_head (a LoRA on lm_head?); export it merged_16bit instead")
    report = GGUFReport(Path(path), ftype.name)
    with gguf_file(path, tmap.arch) as writer:
        _write_metadata(writer, config, tmap, tokenizer, ftype, template, pre_tokenizer, name, report)
        for hf_name, tensor in tensors:
            key, target, _layer = gguf_name(tmap, hf_name)
            data = convert_tensor(tmap, key, hf_name, tensor, config)
            for gname, part in split_tensor(target, data) if isinstance(target, Split) else [(target, data)]:
                choice = tensor_choice(config, gname, part.shape, ftype, tied)
                if choice.reason:
                    report.fallbacks.append(choice.reason)
                writer.add_tensor(gname, quantize(part, choice.qtype), raw_dtype=choice.qtype)
                report.tensor_types[gname] = choice.qtype.name
    if report.fallbacks:  # one line, not one per tensor (SmolLM2's q4_k_m: 210 of them)
        logger.warning("gguf: %d of %d tensors of %s use another type, as llama.cpp's quantizer does, because their row "
                       "length does not fit the type's block (e.g. %s); GGUFReport.fallbacks lists them all",
                       len(report.fallbacks), len(report.tensor_types), report.path.name, report.fallbacks[0])
    logger.info("gguf: wrote %s (%s, %d tensors)", path, ftype.name, len(report.tensor_types))
    return report
