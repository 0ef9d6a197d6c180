"""``quantization_method`` resolved to file types (:func:`resolve_methods`), and the numpy quantizer for each GGUF
tensor type.

No compiler is involved: F32/F16/BF16/Q8_0/Q4_0/Q4_1/Q5_0/Q5_1/MXFP4 use the ``gguf`` package's own numpy quantizers and
Q2_K..Q6_K use fasttune's (``kquants.quantize_k``). Each returns the bytes GGUF stores for the tensor.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from gguf import GGMLQuantizationType
from gguf import quants as gguf_quants

from .kquants import K_QUANT_TYPES, quantize_k
from .mixes import ALIASES, FTYPES, FileType, file_type

Q = GGMLQuantizationType

METHODS: tuple[str, ...] = tuple(FTYPES)

_GGUF_NUMPY = (Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.MXFP4)


def resolve_methods(methods: Any) -> list[FileType]:
    """``quantization_method`` (``"q8_0"`` or ``["q4_k_m", "quantized", "q8_0"]``) -> the distinct file types, in the
    order given. The one place it is resolved and checked (each name by :func:`fasttune.export.gguf.mixes.file_type`);
    what is written downstream takes the result. A value of another type is a TypeError naming it (as Unsloth's)."""
    items = [methods] if isinstance(methods, str) else methods
    if not isinstance(items, (list, tuple)):
        got = f"got {methods!r} ({type(methods).__name__})"
    else:
        bad = next((i for i, m in enumerate(items) if not isinstance(m, str)), None)
        got = None if bad is None else f"item {bad} of the list is {items[bad]!r} ({type(items[bad]).__name__})"
    if got is not None:
        raise TypeError(f"quantization_method: {got}; pass a method name (str) such as 'q8_0' or a list of names such "
                        "as ['q4_k_m', 'q8_0'] (for an unquantized file: 'not_quantized' = f16, 'bf16', 'f32'); "
                        f"names: {sorted(set(METHODS) | set(ALIASES))}")
    if not items:
        raise ValueError("quantization_method: the list is empty; give at least one method such as 'q8_0'")
    return list(dict.fromkeys(file_type(m) for m in items))


def quantize(data: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """Quantize a float32 array ``(..., cols)`` to ``qtype``: float arrays for F32/F16/BF16-as-uint8, else uint8
    blocks ``(..., cols // block * type_size)``. ``cols`` must be a multiple of the type's block size."""
    qtype = Q(qtype)
    data = np.ascontiguousarray(data, dtype=np.float32)
    if qtype in K_QUANT_TYPES:
        return quantize_k(data, qtype)
    if qtype in _GGUF_NUMPY:
        return gguf_quants.quantize(data, qtype)
    supported = ", ".join(t.name for t in _GGUF_NUMPY + K_QUANT_TYPES)
    raise ValueError(f"qtype: {qtype.name} cannot be written by fasttune; supported: {supported}")


def dequantize(data: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """Inverse of ``quantize`` (gguf's reference dequantizers), float32 ``(..., cols)``."""
    return np.asarray(gguf_quants.dequantize(data, Q(qtype)), dtype=np.float32)
