"""The causal-LM forward with fasttune's fused linear cross-entropy.

With ``labels`` (or pre-shifted ``shift_labels``) the forward runs the backbone, then computes the loss with
:func:`fasttune.kernels.fused_linear_cross_entropy`, which never builds the ``(tokens, vocab)`` logits:

    ``loss = sum_i CE(softcap(h_i W^T + b), y_{i+1}) / D``

over positions whose next label is not -100, with ``D = num_items_in_batch`` when the trainer passes it (gradient
accumulation: the label count of the whole accumulated batch), else the count of labels in this batch. Gemma-2's
``final_logit_softcapping`` ``z -> c * tanh(z / c)`` is applied inside the loss.

**In that case the returned ``logits`` is None** (that is the point: they are never built). Without labels the
original forward runs unchanged, so ``generate`` and evaluation with logits keep working. ``fasttune_token_stats=True``
(what fasttune's ``SFTTrainer`` passes) also returns the labelled positions' argmax-correct count and entropy sum,
and ``fasttune_add_aux=False`` leaves a mixture of experts' load-balancing loss out of ``loss`` (returned as
``aux_loss`` only, for the trainer to weight),
taken inside the loss's chunks (:class:`FastCausalLMOutput`); the fallbacks below return no statistics. A call with TRL's
``fused_lm_head=True`` is handed to the forward that was there before fasttune (TRL's own fused head when TRL added
it first), and so is a model whose lm_head is not a plain ``nn.Linear`` (LoRA on the lm_head, ``modules_to_save``).

An lm_head that FSDP2 sharded as a unit of its own (``fully_shard(model.lm_head)``: its class becomes
``FSDPLinear``) keeps the fused loss: the loss runs as that module's forward, so FSDP2's hooks gather the weight for
it and reduce-scatter the weight's gradient after backward, as they would around ``F.linear``.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from fasttune.data.masking import IGNORE_INDEX
from fasttune.kernels import fused_linear_cross_entropy
from fasttune.kernels.cross_entropy import TokenStats

# Tokens per loss chunk are chosen so one chunk's fp32 logits (and their gradient) stay near 128 MiB: 1024 tokens
# for a 32k vocabulary, 256 for Llama-3's 128k (measured: 1024-token chunks at 128k vocab add ~0.75 GiB of peak RSS).
LOGITS_CHUNK_ELEMENTS = 2**25


def loss_chunk_size(vocab_size: int) -> int:
    """Tokens per fused-CE chunk: a power of two in [64, 1024] with ``tokens * vocab <= LOGITS_CHUNK_ELEMENTS``."""
    tokens = max(1, LOGITS_CHUNK_ELEMENTS // max(1, vocab_size))
    return max(64, min(1024, 1 << (tokens.bit_length() - 1)))


@dataclass
class FastCausalLMOutput(CausalLMOutputWithPast):
    """``CausalLMOutputWithPast`` (``logits`` None) plus ``token_stats`` when asked for with ``fasttune_token_stats``."""

    token_stats: TokenStats | None = None
    aux_loss: torch.Tensor | None = None  # a mixture of experts' load-balancing loss (output_router_logits)
    router_logits: tuple[torch.Tensor, ...] | None = None


def shift_for_next_token(labels: torch.Tensor) -> torch.Tensor:
    """``(batch, seq)`` labels -> labels aligned with hidden states: position t predicts label t+1; the last is -100."""
    return F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]


def _fsdp_linear(module: nn.Module) -> bool:
    """An ``nn.Linear`` that FSDP2 made a unit of its own (``fully_shard`` gives it class ``FSDPLinear``, whose bases
    are ``(FSDPModule, nn.Linear)``)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule) and type(module).__bases__[-1] is nn.Linear


def _run_as_forward(module: nn.Module, function: Callable, *inputs: torch.Tensor):
    """``function(*inputs)`` run as ``module``'s forward, inside its forward hooks (FSDP2's gather and reduce)."""
    module.forward = function  # an instance attribute: nn.Module.__call__ calls it between the hooks
    try:
        return module(*inputs)
    finally:
        del module.forward


def make_causal_lm_forward(model: nn.Module, original: Callable) -> Callable:
    """A forward for ``model`` (a ``*ForCausalLM`` instance) that uses fused linear CE when labels are given."""
    text_config = model.config.get_text_config()
    softcap = getattr(text_config, "final_logit_softcapping", None)
    backbone_name = model.base_model_prefix

    @functools.wraps(type(model).forward)
    def forward(*args, labels: torch.Tensor | None = None, shift_labels: torch.Tensor | None = None,
                num_items_in_batch: int | torch.Tensor | None = None, fasttune_token_stats: bool = False,
                fasttune_add_aux: bool = True, **kwargs):
        if len(args) == 1 and "input_ids" not in kwargs:
            kwargs["input_ids"], args = args[0], ()
        lm_head = model.get_output_embeddings()
        sharded_head = _fsdp_linear(lm_head)
        plain_head = type(lm_head) is nn.Linear or sharded_head
        if kwargs.get("fused_lm_head") or (labels is None and shift_labels is None) or args or not plain_head:
            if labels is not None:
                kwargs["labels"] = labels
            if shift_labels is not None:
                kwargs["shift_labels"] = shift_labels
            if num_items_in_batch is not None:
                kwargs["num_items_in_batch"] = num_items_in_batch
            return original(*args, **kwargs)
        kwargs.pop("logits_to_keep", None)
        kwargs.pop("return_dict", None)
        if hasattr(model, "router_aux_loss_coef") and "output_router_logits" not in kwargs:  # a mixture of experts
            kwargs["output_router_logits"] = bool(getattr(model.config, "output_router_logits", False))
        backbone = getattr(model, backbone_name)
        outputs = backbone(**kwargs)
        hidden = outputs.last_hidden_state
        targets = shift_labels if shift_labels is not None else shift_for_next_token(labels)

        def head_loss(h: torch.Tensor):  # lm_head.weight read here: under FSDP2 the gathered weight
            return fused_linear_cross_entropy(
                h, lm_head.weight, targets.to(h.device),
                ignore_index=IGNORE_INDEX, softcap=softcap, num_items_in_batch=num_items_in_batch,
                bias=getattr(lm_head, "bias", None), chunk_size=loss_chunk_size(lm_head.weight.shape[0]),
                return_stats=fasttune_token_stats,
            )

        result = _run_as_forward(lm_head, head_loss, hidden) if sharded_head else head_loss(hidden)
        loss, stats = result if fasttune_token_stats else (result, None)
        aux_loss = _router_aux_loss(model, outputs, kwargs)
        if aux_loss is not None and fasttune_add_aux:  # False: the trainer weights it itself (FastLossMixin)
            loss = loss + model.router_aux_loss_coef * aux_loss.to(loss.device)
        return FastCausalLMOutput(
            loss=loss,
            token_stats=stats,
            aux_loss=aux_loss,
            router_logits=getattr(outputs, "router_logits", None),
            logits=None,
            past_key_values=getattr(outputs, "past_key_values", None),
            hidden_states=getattr(outputs, "hidden_states", None),
            attentions=getattr(outputs, "attentions", None),
        )

    return forward


def _router_aux_loss(model: nn.Module, outputs, kwargs: dict) -> torch.Tensor | None:
    """A mixture of experts' load-balancing loss, as its transformers forward computes it (the modeling module's own
    ``load_balancing_loss_func``), when router logits were asked for; None otherwise."""
    if not kwargs.get("output_router_logits") or getattr(outputs, "router_logits", None) is None:
        return None
    balance = sys.modules[type(model).__module__].load_balancing_loss_func
    return balance(outputs.router_logits, model.num_experts, model.num_experts_per_tok, kwargs.get("attention_mask"))
