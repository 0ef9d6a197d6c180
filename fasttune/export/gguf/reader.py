"""Read a GGUF file written by fasttune back into transformers tensors (dequantized, float32).

The inverse of ``writer.convert_tensor``: GGUF names are mapped back through the family's ``TensorMap``, llama's q/k
rows are un-permuted and Gemma's norm offset is subtracted. Used to build the reference model a quantized file is
validated against (the HF model holding exactly the weights the file holds) and by the round-trip tests.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
from gguf import GGUFReader

from .quants import dequantize
from .tensor_maps import get_tensor_map, is_norm
from .writer import reference_text_config, text_config


def unpermute_rows(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of ``tensor_maps.permute_rows``: ``(n_heads, head_dim / 2, 2, ...) -> (n_heads, 2, head_dim / 2, ...)``."""
    head_dim = weight.shape[0] // n_heads
    rest = weight.shape[1:]
    return weight.reshape(n_heads, head_dim // 2, 2, *rest).swapaxes(1, 2).reshape(weight.shape)


def read_gguf_state(path: str | os.PathLike, config: Any) -> dict[str, torch.Tensor]:
    """transformers-named float32 tensors holding the (dequantized) values stored in the GGUF file at ``path``."""
    c = text_config(config)
    tmap = get_tensor_map(c.model_type)
    reverse: dict[str, str] = {}
    for hf_key, gguf_key in tmap.names.items():
        for layer in range(c.num_hidden_layers):
            reverse[gguf_key.format(layer)] = hf_key.format(layer)
    n_kv = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    state: dict[str, torch.Tensor] = {}
    for tensor in GGUFReader(str(path)).tensors:
        if tensor.name not in reverse:
            continue  # e.g. rope_freqs.weight, computed from the config on the HF side
        hf_name = reverse[tensor.name]
        shape = tuple(int(s) for s in reversed(tensor.shape))
        data = dequantize(np.asarray(tensor.data), tensor.tensor_type).reshape(shape)
        if tmap.permute_qk and hf_name == tmap.q_name.format(_layer(hf_name)):
            data = unpermute_rows(data, c.num_attention_heads)
        elif tmap.permute_qk and hf_name == tmap.k_name.format(_layer(hf_name)):
            data = unpermute_rows(data, n_kv)
        if tmap.norm_offset and is_norm(hf_name):
            data = data - np.float32(tmap.norm_offset)
        state[hf_name] = torch.from_numpy(np.array(data, dtype=np.float32))
    if "lm_head.weight" not in state:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    return state


def _layer(hf_name: str) -> int:
    parts = hf_name.split(".")
    return int(parts[2]) if len(parts) > 2 and parts[2].isdigit() else -1


def reference_model(path: str | os.PathLike, config: Any) -> torch.nn.Module:
    """A float32 transformers model (from ``config``) holding the weights stored in the GGUF file at ``path``."""
    from transformers import AutoModelForCausalLM

    cfg = reference_text_config(config)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    state = read_gguf_state(path, cfg)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if m != "lm_head.weight"]
    if missing or unexpected:
        raise ValueError(f"reference_model: {path} does not fill the model: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    return model.eval()
