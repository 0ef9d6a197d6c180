"""Per-instance switches shared by the facades: training vs inference mode, and the Unsloth-style bound methods."""

from __future__ import annotations

import functools
import logging
import types
from collections.abc import Mapping, Sequence
from typing import Any

from peft import PeftModel
from torch import nn

from . import export
from .distributed import bind_save_pretrained
from .lora.precision import keep_adapter_dtype
from .lora.unwrap import base_model
from .patch import is_patched, patch_model
from .patch.checkpointing import pause_checkpointing, remembered_mode, set_gradient_checkpointing
from .rl import RL_METHODS
from .state import model_state

logger = logging.getLogger("fasttune")

EXPORT_METHODS: tuple[str, ...] = (
    "save_pretrained_merged", "save_pretrained_gguf", "push_to_hub_merged", "push_to_hub_gguf"
)


def attach_model_methods(model: nn.Module) -> None:
    """Unsloth-style ``model.save_pretrained_merged(...)``, ``model.fast_generate(...)``, ``model.save_lora(...)``
    etc., bound on this instance only (no class is touched)."""
    for name in EXPORT_METHODS:
        setattr(model, name, types.MethodType(getattr(export, name), model))
    for name, function in RL_METHODS.items():
        setattr(model, name, types.MethodType(function, model))
    if "save_pretrained" not in vars(model):  # once: a re-attach must not wrap the wrapper
        bind_save_pretrained(model)  # under DDP rank 0 writes; under FSDP2 from the whole weights
    if not getattr(vars(model).get("generate"), "fasttune_takes_encodings", False):
        model.generate = taking_encodings(model.generate)


def taking_encodings(generate: Any) -> Any:
    """``generate``, also taking a tokenizer's encoding (``input_ids``, ``attention_mask``, ...) where it expects the
    ids tensor.

    transformers 4's ``tokenizer.apply_chat_template(messages, tokenize=True, return_tensors="pt")`` returned the ids;
    transformers 5's returns a ``BatchEncoding``, and Unsloth-era notebooks pass it on as
    ``model.generate(input_ids=inputs, ...)`` (or positionally), which transformers 5 fails on (``AttributeError:
    shape``). Its tensors are passed as keyword arguments instead, as ``model.generate(**inputs)`` does; arguments
    given explicitly win. Tensors, and the v5 form ``generate(**inputs)``, pass through unchanged.
    """

    @functools.wraps(generate)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        encoding = None
        if args and isinstance(args[0], Mapping):
            encoding, args = args[0], args[1:]
        else:
            for name in ("input_ids", "inputs"):
                if isinstance(kwargs.get(name), Mapping):
                    encoding = kwargs.pop(name)
                    break
        if encoding is not None:
            kwargs = {**encoding, **kwargs}
        return generate(*args, **kwargs)

    wrapper.fasttune_takes_encodings = True
    return wrapper


class ConversationColumns:
    """A tokenizer's ``apply_chat_template`` that also takes a column of conversations from ``datasets`` >= 4.

    ``dataset["conversations"]`` is a lazy ``datasets.Column`` there, not a list, and transformers (5.25) only treats
    a list or tuple of conversations as a batch: it reads the column as one conversation and fails on its first item
    ("Chat messages should be dicts"). Unsloth's notebooks pass such columns (Qwen3: ``apply_chat_template(
    dataset.map(...)["conversations"], tokenize=False)``), so a sequence that is not a list, whose items are
    conversations, is made a list first; everything else goes to the tokenizer class's own method unchanged. An
    instance attribute of a plain class, so the tokenizer still pickles (datasets' workers, spawn) and saves as before.
    """

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer

    def __call__(self, conversation: Any, *args: Any, **kwargs: Any) -> Any:
        if not isinstance(conversation, (list, tuple, dict, str)) and isinstance(conversation, Sequence):
            conversation = list(conversation)
        return type(self.tokenizer).apply_chat_template(self.tokenizer, conversation, *args, **kwargs)


def prepare_tokenizer(tokenizer: Any, max_seq_length: int) -> Any:
    """Right padding for training, a pad token that is not a real word, the length limit, and chat templates that
    accept a ``datasets`` column of conversations (:class:`ConversationColumns`)."""
    if not isinstance(tokenizer.__dict__.get("apply_chat_template"), ConversationColumns):
        tokenizer.apply_chat_template = ConversationColumns(tokenizer)
    tokenizer.padding_side = "right"
    tokenizer.model_max_length = max_seq_length
    if tokenizer.pad_token is None:
        # An unused special token is the safe pad; eos as pad is the common fallback (labels come from the
        # attention mask in TRL's collators, so padding never becomes a target).
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
        logger.info("fasttune: the tokenizer had no pad token; using %r", tokenizer.pad_token)
    return tokenizer


def finish_loading(model: nn.Module, adapter: str | None, full_finetuning: bool,
                   use_gradient_checkpointing: Any) -> nn.Module:
    """The last steps of both facades' ``from_pretrained``: attach a saved adapter (fused blocks over it), bind the
    Unsloth-style methods, and set what trains (every weight, or the LoRA weights kept in fp32) and checkpointing."""
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter, is_trainable=True)
        if is_patched(model):
            patch_model(model)  # fuse the LoRA blocks over the adapter's layers
    attach_model_methods(model)
    if full_finetuning:
        for param in model.parameters():
            param.requires_grad_(True)
        set_gradient_checkpointing(model, use_gradient_checkpointing)
    else:
        for name, param in model.named_parameters():
            param.requires_grad_("lora_" in name)
        if isinstance(model, PeftModel):
            keep_adapter_dtype(model)  # adapters stay fp32 through TRL's bf16 cast (exact resume)
            # an adapter folder is loaded to train further: same checkpointing as get_peft_model would set
            set_gradient_checkpointing(model, use_gradient_checkpointing)
    return model


def finish_peft(peft_model: PeftModel, use_gradient_checkpointing: Any) -> PeftModel:
    """After LoRA injection (both facades): fused blocks over the new LoRA layers, checkpointing, no KV cache while
    training, adapters kept fp32 (through TRL's bf16 cast: exact resume), the bound methods."""
    if is_patched(peft_model):
        patch_model(peft_model)  # re-patch: fused Q/K/V, O and MLP blocks over the new LoRA layers
    set_gradient_checkpointing(peft_model, use_gradient_checkpointing)
    peft_model.config.use_cache = False
    keep_adapter_dtype(peft_model)
    attach_model_methods(peft_model)
    return peft_model


def for_inference(model: nn.Module) -> nn.Module:
    """Eval mode, no checkpointing, KV cache on, left padding (for batched ``generate``)."""
    model.eval()
    _set_mode_state(model, training=False)
    return model


def for_training(model: nn.Module, use_gradient_checkpointing: Any = None) -> nn.Module:
    """Undo :func:`for_inference`: train mode, checkpointing as before, KV cache off, right padding."""
    model.train()
    _set_mode_state(model, training=True, use_gradient_checkpointing=use_gradient_checkpointing)
    return model


def _set_mode_state(model: nn.Module, training: bool, use_gradient_checkpointing: Any = None) -> None:
    base = base_model(model)
    state = model_state(base)
    if state is not None and state.tokenizer is not None:
        state.tokenizer.padding_side = "right" if training else "left"
    base.config.use_cache = not training
    if training:
        mode = use_gradient_checkpointing
        if mode is None:
            mode = remembered_mode(base) or False
        set_gradient_checkpointing(model, mode)
    else:
        pause_checkpointing(base)
