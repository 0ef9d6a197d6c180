"""Per-tensor GGUF type choice for each file type ("q4_k_m", "q8_0", ...), as llama.cpp's quantizer makes it.

A file type is a *mix*: a default type plus rules that give some tensors more bits (attention V, FFN down of the
first/last layers, the output head) and fallbacks for shapes a type cannot hold. This module reproduces
llama.cpp's ``llama_tensor_get_type`` (src/llama-quant.cpp, imatrix-free, no overrides) for the file types fasttune
writes, so a file written here has the same tensor types as one made with ``llama-quantize`` from an f16 GGUF.

Tensor names are GGUF names ("blk.3.attn_v.weight", "output.weight", "token_embd.weight"); shapes are numpy order
``(..., rows, cols)``, so the row length that a block must divide is ``shape[-1]`` (ggml's ``ne[0]``).

llama.cpp counts attn_v-like and ffn_down tensors in file order; a file with one of each per layer in layer order (every
family fasttune writes) has that count equal to the layer index in the name, which is what is used here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, NamedTuple

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

__all__ = ["ALIASES", "FTYPES", "FileType", "TensorTypeChoice", "choose_tensor_qtype", "fallback_reason", "file_type",
           "tensor_qtype"]

Q = GGMLQuantizationType


class FileType(NamedTuple):
    """A GGUF file type: its default tensor type, llama.cpp's LLAMA_FTYPE value (``general.file_type``), its name."""

    qtype: GGMLQuantizationType
    llama_ftype: int
    name: str


#: file type name -> (default tensor type, llama.cpp's LLAMA_FTYPE value written as general.file_type)
_FILE_TYPES: dict[str, tuple[GGMLQuantizationType, int]] = {
    "f32": (Q.F32, 0),
    "f16": (Q.F16, 1),
    "q4_0": (Q.Q4_0, 2),
    "q4_1": (Q.Q4_1, 3),
    "q8_0": (Q.Q8_0, 7),
    "q5_0": (Q.Q5_0, 8),
    "q5_1": (Q.Q5_1, 9),
    "q2_k": (Q.Q2_K, 10),
    "q3_k_s": (Q.Q3_K, 11),
    "q3_k_m": (Q.Q3_K, 12),
    "q3_k_l": (Q.Q3_K, 13),
    "q4_k_s": (Q.Q4_K, 14),
    "q4_k_m": (Q.Q4_K, 15),
    "q5_k_s": (Q.Q5_K, 16),
    "q5_k_m": (Q.Q5_K, 17),
    "q6_k": (Q.Q6_K, 18),
    "bf16": (Q.BF16, 32),
    # llama.cpp's MXFP4_MOE: every expert tensor (3-D) MXFP4, every other matrix Q8_0; what llama.cpp's converter
    # and the published gpt-oss GGUFs use for gpt-oss's experts (its checkpoints are MXFP4)
    "mxfp4_moe": (Q.MXFP4, 38),
}
FTYPES: dict[str, FileType] = {name: FileType(qtype, number, name) for name, (qtype, number) in _FILE_TYPES.items()}

# Unsloth's quantization_method names that are not file types themselves.
ALIASES: dict[str, str] = {
    "not_quantized": "f16",
    "fast_quantized": "q8_0",
    "quantized": "q4_k_m",
    "q3_k": "q3_k_m",
    "q4_k": "q4_k_m",
    "q5_k": "q5_k_m",
    "mxfp4": "mxfp4_moe",
}


def file_type(method: Any) -> FileType:
    """The file type a ``quantization_method`` name stands for (case-insensitive, Unsloth's aliases resolved); a
    resolved :class:`FileType` is returned as it is. The one place a method name is checked: an unknown name or a
    non-string raises, listing the allowed names."""
    if isinstance(method, FileType):
        return method
    if not isinstance(method, str):
        raise TypeError(f"quantization_method: got {method!r} ({type(method).__name__}); pass a method name (str) "
                        f"such as 'q8_0'; names: {sorted(set(FTYPES) | set(ALIASES))}")
    key = method.strip().lower()
    key = ALIASES.get(key, key)
    if key not in FTYPES:
        raise ValueError(f"quantization_method: {method!r} is not supported; choose one of "
                         f"{sorted(set(FTYPES) | set(ALIASES))}")
    return FTYPES[key]

_UNQUANTIZED = (Q.F32, Q.F16, Q.BF16)
# where a tensor's row length does not fit the chosen type (llama.cpp tensor_type_fallback)
_FALLBACK = {Q.Q2_K: Q.Q4_0, Q.Q3_K: Q.Q4_0, Q.Q4_K: Q.Q5_0, Q.Q5_K: Q.Q5_1, Q.Q6_K: Q.Q8_0}
# 2-D ".weight" tensors that llama.cpp never quantizes (name substrings)
_NEVER_QUANTIZED = (
    "_norm.weight", "ffn_gate_inp.weight", "altup", "laurel", "per_layer_model_proj", "ssm_conv1d",
    "shortconv.conv.weight", "attn_rel_b.weight", "time_mix_", ".position_embd", ".rel_pos", ".patch_embd",
)
_NEVER_QUANTIZED_EXACT = ("position_embd.weight", "token_types.weight")
_LAYER = re.compile(r"blk\.(\d+)\.")


@dataclass(frozen=True)
class TensorTypeChoice:
    """The type chosen for one tensor.

    qtype: the type to write. planned: the type the mix asked for before the shape fallback (equal to qtype when
    none happened). reason: why a fallback happened, for the log (None when it did not).
    """

    qtype: GGMLQuantizationType
    planned: GGMLQuantizationType
    reason: str | None = None


def _category(name: str) -> str:
    """llama.cpp's tensor_get_category, on the GGUF name (first match wins)."""
    if name == "output.weight":
        return "output"
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return "token_embd"
    for key, cat in (
        ("attn_qkv.weight", "attn_v"),  # fused QKV and DeepSeek's kv_b follow the attn_v rules
        ("attn_kv_b.weight", "attn_v"),
        ("attn_v.weight", "attn_v"),
        ("attn_k.weight", "attn_k"),
        ("attn_q.weight", "attn_q"),
        ("attn_output.weight", "attn_output"),
        ("ffn_up", "ffn_up"),
        ("ffn_gate", "ffn_gate"),
        ("ffn_down", "ffn_down"),
    ):
        if key in name:
            return cat
    return "other"


def _allows_quantization(name: str, shape: tuple[int, ...]) -> bool:
    if len(shape) < 2 or not name.endswith("weight"):
        return False
    if name in _NEVER_QUANTIZED_EXACT:
        return False
    return not any(key in name for key in _NEVER_QUANTIZED)


def _use_more_bits(i_layer: int, n_layers: int) -> bool:
    """The layers q4_k_m / q5_k_m give more bits: the first and last eighth, and every third one between."""
    if i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8:
        return True
    return (i_layer - n_layers // 8) % 3 == 2


def _layer_index(name: str, n_layers: int) -> int:
    match = _LAYER.search(name)
    if match is None:
        raise ValueError(f"name: {name!r} has no 'blk.N.' layer index, which the {_category(name)} rules need")
    i_layer = int(match.group(1))
    if not 0 <= i_layer < n_layers:
        raise ValueError(f"name: {name!r} has layer {i_layer}, outside [0, n_layers={n_layers})")
    return i_layer


def _mix_rule(name: str, shape: tuple[int, ...], ftype: str, default: Q, n_layers: int, n_expert: int,
              n_gqa: int, arch: str, tied_embeddings: bool) -> Q:
    """llama_tensor_get_type_impl for the non-IQ file types: the type the mix wants, before shape fallbacks."""
    cat = _category(name)
    falcon = arch == "falcon"
    new = default
    if cat == "output" or (tied_embeddings and cat == "token_embd"):
        if ftype == "mxfp4_moe" or falcon or shape[-1] % GGML_QUANT_SIZES[new][0] != 0:
            return Q.Q8_0
        return Q.Q6_K if new != Q.Q8_0 else new
    if ftype == "mxfp4_moe":  # experts (ne[2] > 1) MXFP4, everything else Q8_0
        return Q.MXFP4 if len(shape) == 3 and shape[0] > 1 else Q.Q8_0
    if cat == "token_embd":
        return new
    if cat == "attn_v":
        i = _layer_index(name, n_layers)
        if ftype == "q2_k":
            new = Q.Q4_K if n_gqa >= 4 else Q.Q3_K
        elif ftype == "q3_k_m":
            new = Q.Q5_K if i < 2 else Q.Q4_K
        elif ftype == "q3_k_l":
            new = Q.Q5_K
        elif ftype in ("q4_k_m", "q5_k_m") and _use_more_bits(i, n_layers):
            new = Q.Q6_K
        elif ftype == "q4_k_s" and i < 4:
            new = Q.Q5_K
        if arch == "llama" and n_layers == 80 and n_gqa > 1 and new in (Q.Q3_K, Q.Q4_K):  # llama.cpp's LLM_TYPE_70B
            new = Q.Q5_K
        return Q.Q8_0 if n_expert == 8 else new
    if cat == "attn_k":
        return Q.Q8_0 if n_expert == 8 else new
    if cat == "ffn_down":
        i = _layer_index(name, n_layers)
        if ftype == "q2_k":
            new = Q.Q3_K
        elif ftype == "q3_k_m":
            more = not falcon or _use_more_bits(i, n_layers)
            new = Q.Q5_K if i < n_layers // 16 else Q.Q4_K if more else Q.Q3_K
        elif ftype == "q3_k_l":
            new = Q.Q4_K if falcon else Q.Q5_K
        elif ftype == "q4_k_m":
            if falcon:
                new = Q.Q6_K if i < n_layers // 16 else Q.Q5_K if _use_more_bits(i, n_layers) else Q.Q4_K
            elif _use_more_bits(i, n_layers):
                new = Q.Q6_K
        elif ftype == "q5_k_m" and _use_more_bits(i, n_layers):
            new = Q.Q6_K
        elif ftype == "q4_k_s" and not falcon and i < n_layers // 8:
            new = Q.Q5_K
        return new
    if cat == "attn_output":
        if falcon:
            return Q.Q4_K if ftype == "q3_k_l" else new
        if n_expert == 8:
            return Q.Q5_K if ftype in ("q2_k", "q3_k_s", "q3_k_m", "q4_k_s", "q4_k_m") else new
        return {"q2_k": Q.Q3_K, "q3_k_m": Q.Q4_K, "q3_k_l": Q.Q5_K}.get(ftype, new)
    return new


def _fallback(name: str, cols: int, qtype: Q) -> tuple[Q, str | None]:
    """llama.cpp tensor_type_fallback: a type whose block does not divide the row length is replaced."""
    block = GGML_QUANT_SIZES[qtype][0]
    if cols % block == 0:
        return qtype, None
    new = _FALLBACK.get(qtype, qtype)
    if cols % GGML_QUANT_SIZES[new][0] != 0:
        new = Q.F16
    reason = (
        f"{name}: row length {cols} is not a multiple of {block} (needed by {qtype.name}); falling back to {new.name}"
    )
    return new, reason


def choose_tensor_qtype(
    name: str,
    shape: tuple[int, ...],
    ftype: FileType | str,
    n_layers: int,
    n_expert: int = 0,
    *,
    n_gqa: int = 1,
    arch: str = "llama",
    tied_embeddings: bool = False,
) -> TensorTypeChoice:
    """The GGUF type llama.cpp's quantizer gives tensor ``name`` of ``shape`` in a file of type ``ftype`` (a
    :class:`FileType`, or a name :func:`file_type` resolves).

    n_layers: the model's block count. n_expert: experts per MoE layer (0 or 1 for dense). n_gqa: n_head // n_head_kv
    (only q2_k's attn_v rule and the llama-70B rule read it). arch: GGUF architecture name (falcon has its own rules).
    tied_embeddings: True when the file has no output.weight, so token_embd doubles as the output head and gets its
    type. 1-D tensors (norms, biases) and tensors llama.cpp never quantizes stay F32.
    """
    resolved = file_type(ftype)
    if n_layers < 1:
        raise ValueError(f"n_layers: {n_layers} must be >= 1")
    shape = tuple(int(s) for s in shape)
    default = resolved.qtype
    if not _allows_quantization(name, shape):
        return TensorTypeChoice(Q.F32, Q.F32)
    if default in _UNQUANTIZED:
        return TensorTypeChoice(default, default)
    planned = _mix_rule(name, shape, resolved.name, default, n_layers, n_expert, n_gqa, arch, tied_embeddings)
    qtype, reason = _fallback(name, shape[-1], planned)
    return TensorTypeChoice(qtype, planned, reason)


def tensor_qtype(
    name: str,
    shape: tuple[int, ...],
    ftype: FileType | str,
    n_layers: int,
    n_expert: int = 0,
    *,
    n_gqa: int = 1,
    arch: str = "llama",
    tied_embeddings: bool = False,
) -> GGMLQuantizationType:
    """The type to write for one tensor; see `choose_tensor_qtype` for the parameters."""
    return choose_tensor_qtype(
        name, shape, ftype, n_layers, n_expert, n_gqa=n_gqa, arch=arch, tied_embeddings=tied_embeddings
    ).qtype


def fallback_reason(
    name: str,
    shape: tuple[int, ...],
    ftype: FileType | str,
    n_layers: int,
    n_expert: int = 0,
    *,
    n_gqa: int = 1,
    arch: str = "llama",
    tied_embeddings: bool = False,
) -> str | None:
    """Why the mix's type could not be used for this tensor (a line for the log), or None when it could."""
    return choose_tensor_qtype(
        name, shape, ftype, n_layers, n_expert, n_gqa=n_gqa, arch=arch, tied_embeddings=tied_embeddings
    ).reason
