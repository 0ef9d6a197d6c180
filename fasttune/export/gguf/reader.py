"""Read a GGUF file written by fasttune back into transformers tensors (dequantized, float32).

The inverse of ``writer.convert_tensor``: GGUF names are mapped back through the family's ``TensorMap``, llama's q/k
rows are un-permuted and Gemma's norm offset is subtracted. Used to build the reference model a quantized file is
validated against (the HF model holding exactly the weights the file holds) and by the round-trip tests.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import quant_shape_to_byte_shape

from .quants import dequantize
from .tensor_maps import Split, get_tensor_map, gguf_names, is_norm, join_tensor
from .writer import reference_text_config, text_config


def unpermute_rows(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of ``tensor_maps.permute_rows``: ``(n_heads, head_dim / 2, 2, ...) -> (n_heads, 2, head_dim / 2, ...)``."""
    head_dim = weight.shape[0] // n_heads
    rest = weight.shape[1:]
    return weight.reshape(n_heads, head_dim // 2, 2, *rest).swapaxes(1, 2).reshape(weight.shape)


@dataclass
class GGUFTensor:
    """One tensor of a GGUF file: its name, ggml type, ggml shape (innermost first) and data (memory-mapped, as
    ``gguf.GGUFReader`` gives it: typed for float types, bytes ``(..., row bytes)`` for quantized ones)."""

    name: str
    tensor_type: GGMLQuantizationType
    shape: tuple[int, ...]
    data: np.ndarray


# Byte sizes of the fixed-size GGUF metadata value types (uint8 .. float64 by type id; 8 = string, 9 = array).
_VALUE_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_FLOAT_TYPES = {GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16}


def gguf_tensors(path: str | os.PathLike) -> Iterator[GGUFTensor]:
    """The tensors of the GGUF file at ``path``, without parsing its metadata values.

    ``gguf.GGUFReader`` builds a numpy view for every metadata element: 18 s for Gemma-3's 262144-entry vocabulary
    (2026-12-07), while the tensors need only the header. This walks the metadata by size, reads the tensor index and
    memory-maps the data (the format: github.com/ggml-org/ggml, docs/gguf.md).
    """
    raw = np.memmap(path, mode="r")
    buf = memoryview(raw)
    if bytes(buf[:4]) != b"GGUF":
        raise ValueError(f"{path}: not a GGUF file")
    version, n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
    if version < 2:
        raise ValueError(f"{path}: GGUF version {version} is not supported (2 or later)")
    pos, alignment = 24, 32

    def string(at: int) -> tuple[str, int]:
        (n,) = struct.unpack_from("<Q", buf, at)
        return bytes(buf[at + 8:at + 8 + n]).decode("utf-8"), at + 8 + n

    def skip_value(kind: int, at: int) -> int:
        if kind in _VALUE_SIZES:
            return at + _VALUE_SIZES[kind]
        if kind == 8:
            return at + 8 + struct.unpack_from("<Q", buf, at)[0]
        if kind == 9:
            inner, count = struct.unpack_from("<IQ", buf, at)
            at += 12
            if inner in _VALUE_SIZES:
                return at + count * _VALUE_SIZES[inner]
            for _ in range(count):
                at = skip_value(inner, at)
            return at
        raise ValueError(f"{path}: unknown metadata value type {kind} at byte {at}")

    for _ in range(n_kv):
        key, pos = string(pos)
        (kind,) = struct.unpack_from("<I", buf, pos)
        if key == "general.alignment" and kind == 4:
            (alignment,) = struct.unpack_from("<I", buf, pos + 4)
        pos = skip_value(kind, pos + 4)
    index = []
    for _ in range(n_tensors):
        name, pos = string(pos)
        (n_dims,) = struct.unpack_from("<I", buf, pos)
        dims = struct.unpack_from(f"<{n_dims}Q", buf, pos + 4)
        qtype, offset = struct.unpack_from("<IQ", buf, pos + 4 + 8 * n_dims)
        pos += 4 + 8 * n_dims + 12
        index.append((name, GGMLQuantizationType(qtype), tuple(int(d) for d in dims), offset))
    start = (pos + alignment - 1) // alignment * alignment
    for name, qtype, dims, offset in index:
        np_shape = tuple(reversed(dims))
        count = int(np.prod(dims))
        block, type_size = GGML_QUANT_SIZES[qtype]
        if qtype in _FLOAT_TYPES:
            dtype = _FLOAT_TYPES[qtype]
            data = np.frombuffer(raw, dtype=dtype, count=count, offset=start + offset).reshape(np_shape)
        else:
            n_bytes = count * type_size // block
            data = np.frombuffer(raw, dtype=np.uint8, count=n_bytes, offset=start + offset)
            data = data.reshape(quant_shape_to_byte_shape(np_shape, qtype))
        yield GGUFTensor(name, qtype, dims, data)


def read_gguf_state(path: str | os.PathLike, config: Any) -> dict[str, torch.Tensor]:
    """transformers-named float32 tensors holding the (dequantized) values stored in the GGUF file at ``path``."""
    c = text_config(config)
    tmap = get_tensor_map(c.model_type)
    reverse: dict[str, tuple[str, int]] = {}  # GGUF name -> (transformers name, index among its Split's parts)
    splits: dict[str, Split] = {}
    for hf_key, target in tmap.names.items():
        for layer in range(c.num_hidden_layers) if "{}" in hf_key else [None]:
            hf_name = hf_key.format(layer) if layer is not None else hf_key
            for i, gguf_key in enumerate(gguf_names(target)):
                reverse[gguf_key.format(layer) if layer is not None else gguf_key] = (hf_name, i)
            if isinstance(target, Split):
                splits[hf_name] = target
    n_kv = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    state: dict[str, torch.Tensor] = {}
    parts: dict[str, dict[int, np.ndarray]] = {}
    for tensor in gguf_tensors(path):
        if tensor.name not in reverse:
            continue  # e.g. rope_freqs.weight, computed from the config on the HF side
        hf_name, index = reverse[tensor.name]
        shape = tuple(int(s) for s in reversed(tensor.shape))
        data = dequantize(np.asarray(tensor.data), tensor.tensor_type).reshape(shape)
        if hf_name in splits:
            got = parts.setdefault(hf_name, {})
            got[index] = data
            if len(got) < len(splits[hf_name].names):
                continue
            data = join_tensor(splits[hf_name], [got[i] for i in range(len(got))])
            del parts[hf_name]
        if tmap.permute_qk and hf_name == tmap.q_name.format(_layer(hf_name)):
            data = unpermute_rows(data, c.num_attention_heads)
        elif tmap.permute_qk and hf_name == tmap.k_name.format(_layer(hf_name)):
            data = unpermute_rows(data, n_kv)
        if tmap.norm_offset and is_norm(hf_name):
            data = data - np.float32(tmap.norm_offset)
        state[hf_name] = torch.from_numpy(np.array(data, dtype=np.float32))
    if parts:
        raise ValueError(f"{path}: the file lacks parts of {sorted(parts)} (each is written as several tensors)")
    if "lm_head.weight" not in state:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    return state


def _layer(hf_name: str) -> int:
    parts = hf_name.split(".")
    return int(parts[2]) if len(parts) > 2 and parts[2].isdigit() else -1


def reference_model(path: str | os.PathLike, config: Any) -> torch.nn.Module:
    """A float32 transformers model (from ``config``) holding the weights stored in the GGUF file at ``path``."""
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    cfg = reference_text_config(config)
    with no_init_weights():  # no random initialisation (5.6 s for Gemma-3-270M): every weight comes from the file
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    state = read_gguf_state(path, cfg)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if m != "lm_head.weight"]
    if missing or unexpected:
        raise ValueError(f"reference_model: {path} does not fill the model: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    return model.eval()
