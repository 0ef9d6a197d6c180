"""Attention for padding-free rows: SDPA run on each packed segment separately (exact, and cheaper).

For one packed row of segments ``n_1..n_k`` transformers' SDPA path builds a block-diagonal causal mask and computes
all ``(sum n_i)^2`` scores; running causal SDPA per segment computes only ``sum n_i^2`` of them and uses the faster
``is_causal`` kernel. A sliding-window layer (Gemma 2/3, Mistral, ...) does the same: a segment no longer than the
window is plain causal, a longer one gets the window's ``(n, n)`` mask. The segment bounds come from the
``cu_seq_lens_q`` that :class:`PaddingFreeCollator` puts in the batch (transformers forwards them to the attention
function). On CPU without dropout the segments go through :func:`fasttune.kernels.segment_attention.segment_attention`
(the same flash kernel per segment), whose checkpoint recompute reuses the first forward's output and log-sum-exp
instead of running attention again (``heads x N x (d + 1)`` values kept per layer between forward and backward).
Anything else -- no ``cu_seq_lens``, more than one row, a KV cache, attention softcapping -- runs transformers' own
SDPA with its mask, unchanged.

It is registered with transformers' attention/mask interfaces under :data:`NAME` (a new name; nothing existing is
changed) while at least one patched model uses it: ``patch_model`` acquires it for a model's config, ``unpatch_model``
restores the model's previous choice and releases it, and the last release removes the name again.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import (
    AttentionMaskInterface,
    create_causal_mask,
    create_sliding_window_causal_mask,
    find_packed_sequence_indices,
    sdpa_mask,
)
from transformers.modeling_utils import AttentionInterface

from ..kernels.segment_attention import segment_attention, window_mask

NAME = "fasttune_packed_sdpa"


def _segmentable(module: nn.Module, query: torch.Tensor, key: torch.Tensor, cu: torch.Tensor | None) -> bool:
    return (
        cu is not None
        and query.shape[0] == 1
        and query.shape[2] == key.shape[2] == int(cu[-1])
        and getattr(module, "attn_logit_softcapping", None) is None
    )


def _segment_sdpa(query, key, value, window: int | None, dropout: float, scaling: float | None, gqa: bool):
    """Causal SDPA on one segment ``(1, h, n, d)``; a segment longer than a sliding window gets the window's mask."""
    n = query.shape[2]
    if window is None or n <= window:
        return F.scaled_dot_product_attention(query, key, value, is_causal=True, dropout_p=dropout, scale=scaling,
                                              enable_gqa=gqa)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=window_mask(n, window, query.device),
                                          dropout_p=dropout, scale=scaling, enable_gqa=gqa)


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
    window = getattr(module, "sliding_window", None)
    p = dropout if module.training else 0.0
    if query.device.type == "cpu" and p == 0.0:  # the recompute of a checkpointed layer reuses this forward's result
        lengths = tuple(b - a for a, b in zip(bounds[:-1], bounds[1:]) if b > a)
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        out = segment_attention(query[0], key[0], value[0], lengths, scale, causal=True, window=window)
        return out.transpose(0, 1).unsqueeze(0).contiguous(), None
    outs = [_segment_sdpa(query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], window, p, scaling, gqa)
            for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
    return torch.cat(outs, dim=2).transpose(1, 2).contiguous(), None


# id -> config of each patched model that uses NAME (configs are unhashable); weak, so a model dropped without
# unpatch_model does not pin it
_users: weakref.WeakValueDictionary[int, object] = weakref.WeakValueDictionary()


def acquire(owner: object) -> None:
    """Make :data:`NAME` known to transformers for ``owner`` (a model config): our attention, SDPA's mask."""
    _users[id(owner)] = owner
    AttentionInterface.register(NAME, packed_sdpa_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)


def release(owner: object) -> None:
    """``owner`` no longer uses :data:`NAME`; when nothing does, remove it from transformers' registries.

    transformers offers ``register`` but no unregister, so this removes the key from the class-wide mapping that
    ``register`` writes (``GeneralInterface._global_mapping``); only our own key is touched.
    """
    _users.pop(id(owner), None)
    if len(_users) == 0:
        for interface in (AttentionInterface, AttentionMaskInterface):
            interface._global_mapping.pop(NAME, None)


def is_registered() -> bool:
    return NAME in AttentionInterface._global_mapping or NAME in AttentionMaskInterface._global_mapping


def make_packed_mask_forward(backbone: nn.Module, original):
    """A backbone forward that builds the per-layer-type masks from the position ids when a row is packed.

    For a family whose backbone creates its masks without ``position_ids`` (``FamilySpec.packed_masks``): with no
    ``attention_mask``, no cache and position ids that restart inside a row (a padding-free batch), the causal and
    sliding-window masks are made here with the position ids, as transformers does for the other families, so each
    example attends only to itself; any other call runs the backbone unchanged.
    """
    config = backbone.config

    def forward(input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, **kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if attention_mask is None and position_ids is not None and cache is None and not kwargs.get("use_cache"):
            if find_packed_sequence_indices(position_ids.reshape(1, -1) if position_ids.dim() == 1
                                            else position_ids) is not None:
                if inputs_embeds is None:
                    inputs_embeds, input_ids = backbone.embed_tokens(input_ids), None
                mask_kwargs = dict(config=config, inputs_embeds=inputs_embeds, attention_mask=None, cache=None,
                                   position_ids=position_ids)
                attention_mask = {"full_attention": create_causal_mask(**mask_kwargs),
                                  "sliding_attention": create_sliding_window_causal_mask(**mask_kwargs)}
        return original(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                        inputs_embeds=inputs_embeds, **kwargs)

    return forward
