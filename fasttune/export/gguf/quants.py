"""Quantization method names (Unsloth's, with aliases) and the numpy quantizer for each GGUF tensor type.

No compiler is involved: F32/F16/BF16/Q8_0/Q4_0/Q4_1/Q5_0/Q5_1 use the ``gguf`` package's own numpy quantizers and
Q2_K..Q6_K use fasttune's (``kquants.quantize_k``). Each returns the bytes GGUF stores for the tensor.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType
from gguf import quants as gguf_quants

from .kquants import quantize_k
from .mixes import FTYPES

Q = GGMLQuantizationType

# Unsloth's quantization_method names that are not file types themselves.
ALIASES: dict[str, str] = {
    "not_quantized": "f16",
    "fast_quantized": "q8_0",
    "quantized": "q4_k_m",
    "q3_k": "q3_k_m",
    "q4_k": "q4_k_m",
    "q5_k": "q5_k_m",
}
METHODS: tuple[str, ...] = tuple(FTYPES)

_GGUF_NUMPY = (Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1)
_K_TYPES = (Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K)


def resolve_method(method: str) -> str:
    """The file type for ``method`` (case-insensitive; aliases resolved). Unknown names raise, listing the allowed."""
    if not isinstance(method, str):
        raise TypeError(f"quantization_method: expected a string or a list of strings, got {type(method).__name__}")
    key = method.strip().lower()
    key = ALIASES.get(key, key)
    if key not in FTYPES:
        allowed = sorted(set(FTYPES) | set(ALIASES))
        raise ValueError(f"quantization_method: {method!r} is not supported; choose one of {allowed}")
    return key


def resolve_methods(methods: str | list[str] | tuple[str, ...]) -> list[str]:
    """``"q8_0"`` or ``["q4_k_m", "quantized", "q8_0"]`` -> distinct file types in the order given."""
    items = [methods] if isinstance(methods, str) else list(methods)
    if not items:
        raise ValueError("quantization_method: the list is empty; give at least one method such as 'q8_0'")
    return list(dict.fromkeys(resolve_method(m) for m in items))


def file_type_id(ftype: str) -> int:
    """llama.cpp's LLAMA_FTYPE number for ``general.file_type``."""
    return FTYPES[resolve_method(ftype)][1]


def quantize(data: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """Quantize a float32 array ``(..., cols)`` to ``qtype``: float arrays for F32/F16/BF16-as-uint8, else uint8
    blocks ``(..., cols // block * type_size)``. ``cols`` must be a multiple of the type's block size."""
    qtype = Q(qtype)
    data = np.ascontiguousarray(data, dtype=np.float32)
    if qtype in _K_TYPES:
        return quantize_k(data, qtype)
    if qtype in _GGUF_NUMPY:
        return gguf_quants.quantize(data, qtype)
    supported = ", ".join(t.name for t in _GGUF_NUMPY + _K_TYPES)
    raise ValueError(f"qtype: {qtype.name} cannot be written by fasttune; supported: {supported}")


def dequantize(data: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """Inverse of ``quantize`` (gguf's reference dequantizers), float32 ``(..., cols)``."""
    return np.asarray(gguf_quants.dequantize(data, Q(qtype)), dtype=np.float32)
