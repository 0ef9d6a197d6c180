"""Attention for padding-free rows: SDPA run on each packed segment separately (exact, and cheaper).

For one packed row of segments ``n_1..n_k`` transformers' SDPA path builds a block-diagonal causal mask and computes
all ``(sum n_i)^2`` scores; running causal SDPA per segment computes only ``sum n_i^2`` of them and uses the faster
``is_causal`` kernel. The segment bounds come from the ``cu_seq_lens_q`` that :class:`PaddingFreeCollator` puts in the
batch (transformers forwards them to the attention function). Anything else -- no ``cu_seq_lens``, more than one row,
a KV cache, a sliding window, attention softcapping -- runs transformers' own SDPA with its mask, unchanged.

It is registered with transformers' attention/mask interfaces under :data:`NAME` (a new name; nothing existing is
changed) when ``patch_model`` selects it on a model, and the model's previous choice is restored by ``unpatch_model``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import AttentionInterface

NAME = "fasttune_packed_sdpa"


def _segmentable(module: nn.Module, query: torch.Tensor, key: torch.Tensor, cu: torch.Tensor | None) -> bool:
    return (
        cu is not None
        and query.shape[0] == 1
        and query.shape[2] == key.shape[2] == int(cu[-1])
        and getattr(module, "sliding_window", None) is None
        and getattr(module, "attn_logit_softcapping", None) is None
    )


def packed_sdpa_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                          **kwargs) -> tuple[torch.Tensor, None]:
    """query ``(1, hq, S, d)``, key/value ``(1, hk, S, d)`` -> ``(1, S, hq, d)``: causal SDPA inside each segment."""
    cu = kwargs.get("cu_seq_lens_q")
    if not _segmentable(module, query, key, cu):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    bounds = cu.tolist()
    gqa = query.shape[1] != key.shape[1]
    outs = [
        F.scaled_dot_product_attention(query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], is_causal=True,
                                       dropout_p=dropout if module.training else 0.0, scale=scaling, enable_gqa=gqa)
        for a, b in zip(bounds[:-1], bounds[1:]) if b > a
    ]
    return torch.cat(outs, dim=2).transpose(1, 2).contiguous(), None


def register() -> None:
    """Make :data:`NAME` known to transformers (idempotent): our attention, and SDPA's mask for its fallbacks."""
    AttentionInterface.register(NAME, packed_sdpa_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
