"""GGUF tensor names and value transforms of each family, looked up in :mod:`fasttune.models`.

Each family file (``fasttune/models/<family>.py``) declares its :class:`~fasttune.models.gguf.TensorMap` (names as
data, ``{}`` for the layer index; why q/k rows are permuted and Gemma norms offset is explained there). This module
walks those maps: :func:`gguf_name` renames one tensor (an unknown tensor is an error, never a silent drop),
:func:`split_tensor` / :func:`join_tensor` cut one tensor into the GGUF tensors a :class:`~fasttune.models.gguf.Split`
names and put them back together, and :func:`permute_rows` reorders q/k rows from rotate-half to interleaved RoPE order.
"""

from __future__ import annotations

import re
from dataclasses import replace

import numpy as np

from fasttune.models import Split, TensorMap, families

__all__ = ["TENSOR_MAPS", "Split", "TensorMap", "get_tensor_map", "gguf_name", "gguf_names", "is_norm", "join_tensor",
           "permute_rows", "split_tensor"]

# transformers model_type of the text model -> its map, for every family that can be written to GGUF.
TENSOR_MAPS: dict[str, TensorMap] = {spec.model_type: spec.gguf for spec in families() if spec.gguf is not None}

_LAYER_INDEX = re.compile(r"^(model\.layers\.)(\d+)(\..+)$")


def get_tensor_map(model_type: str) -> TensorMap:
    """The map of a transformers ``model_type``; an error lists the supported ones."""
    if model_type not in TENSOR_MAPS:
        raise ValueError(
            f"model_type: {model_type!r} has no GGUF tensor map in fasttune; supported: {sorted(TENSOR_MAPS)}"
        )
    return TENSOR_MAPS[model_type]


def gguf_names(target: str | Split) -> tuple[str, ...]:
    """The GGUF name(s) (``{}`` for the layer) of one map entry."""
    return target.names if isinstance(target, Split) else (target,)


def split_tensor(split: Split, data: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """The GGUF tensors (names still holding ``{}``) one tensor is written as, as :class:`Split` says."""
    if split.transposed:
        data = data.swapaxes(-1, -2)
    n = len(split.names)
    if split.squeeze:
        parts = [np.take(data, i, axis=split.dim) for i in range(n)]
    elif split.interleaved:
        dim = split.dim % data.ndim
        parts = [data[(slice(None),) * dim + (slice(k, None, n),)] for k in range(n)]
    else:
        parts = np.split(data, n, axis=split.dim)
    return list(zip(split.names, parts))


def join_tensor(split: Split, parts: list[np.ndarray]) -> np.ndarray:
    """Inverse of :func:`split_tensor`: the transformers tensor from its GGUF parts, given in ``split.names`` order."""
    if split.squeeze:
        data = np.stack(parts, axis=split.dim)
    elif split.interleaved:
        data = np.stack(parts, axis=split.dim % parts[0].ndim + 1)
        shape = list(parts[0].shape)
        shape[split.dim % parts[0].ndim] *= len(parts)
        data = data.reshape(shape)
    else:
        data = np.concatenate(parts, axis=split.dim)
    return data.swapaxes(-1, -2) if split.transposed else data


def gguf_name(tmap: TensorMap, hf_name: str) -> tuple[str, str | Split, int | None]:
    """``(key, target, layer)``: ``("model.layers.{}.self_attn.q_proj.weight", "blk.3.attn_q.weight", 3)`` for
    ``"model.layers.3.self_attn.q_proj.weight"``; layer is None for global tensors. A tensor written as several GGUF
    tensors has a :class:`Split` target whose names hold the layer.

    Raises ``KeyError`` naming the tensor when the map has no entry (a tensor is never dropped silently).
    """
    match = _LAYER_INDEX.match(hf_name)
    key, layer = (f"{match[1]}{{}}{match[3]}", int(match[2])) if match else (hf_name, None)
    if key not in tmap.names:
        raise KeyError(f"tensor {hf_name!r} has no GGUF name in the {tmap.arch} tensor map (looked up {key!r})")
    target = tmap.names[key]
    if layer is None:
        return key, target, None
    if isinstance(target, Split):
        return key, replace(target, names=tuple(n.format(layer) for n in target.names)), layer
    return key, target.format(layer), layer


def permute_rows(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Reorder the rows of a q/k projection (rows = n_heads * head_dim) from rotate-half to interleaved RoPE order.

    Within each head, row ``j`` of the first half goes to ``2j`` and row ``j`` of the second half to ``2j + 1``:
    ``(n_heads, 2, head_dim / 2, ...) -> (n_heads, head_dim / 2, 2, ...)``. Works for weights (rows, in) and
    biases (rows,).
    """
    rows = weight.shape[0]
    if rows % (2 * n_heads) != 0:
        raise ValueError(f"permute_rows: {rows} rows cannot be split into {n_heads} heads of even size")
    head_dim = rows // n_heads
    rest = weight.shape[1:]
    return weight.reshape(n_heads, 2, head_dim // 2, *rest).swapaxes(1, 2).reshape(weight.shape)


def is_norm(hf_name: str) -> bool:
    """True for RMSNorm weights (the ones Gemma's ``norm_offset`` applies to)."""
    return hf_name.endswith("norm.weight")
