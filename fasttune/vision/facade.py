"""``FastVisionModel``: load, adapt and switch modes of vision-language models (Unsloth-compatible API).

It orchestrates like ``FastLanguageModel``, through the same steps (:mod:`fasttune.loading`): the model is
transformers' own (``AutoModelForImageTextToText``), the processor comes from
:func:`fasttune.vision.processor.load_processor` (works without torchvision), 4-bit/8-bit keep the vision tower and
projector in 16-bit (:data:`fasttune.vision.towers.QUANT_SKIP`), the language tower gets the text fast path of its
family (fused norms, LoRA Q/K/V/O and MLP, fused linear cross-entropy), and LoRA targets come from Unsloth's four
``finetune_*`` switches (:func:`fasttune.vision.towers.lora_targets`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from peft import PeftModel
from transformers import AutoModelForImageTextToText, PreTrainedModel

from fasttune import modes
from fasttune.config import DEFAULT_TARGET_MODULES, LoraSettings
from fasttune.loading import add_lora, load_config, load_pretrained, source_of
from fasttune.source import ModelSource

from .processor import load_processor
from .towers import QUANT_SKIP, has_vision_tower, lora_targets

logger = logging.getLogger("fasttune")


def is_vision_config(config: Any) -> bool:
    """Whether a transformers config is a vision-language model's (it has a vision tower config)."""
    return getattr(config, "vision_config", None) is not None


class FastVisionModel:
    """Vision-language models with Unsloth's names and defaults; the models are transformers/peft models."""

    @staticmethod
    def from_pretrained(
        model_name: str | ModelSource = "unsloth/Qwen2.5-VL-7B-Instruct",
        max_seq_length: int = 2048,
        dtype: torch.dtype | str | None = None,
        load_in_4bit: bool = True,
        load_in_8bit: bool = False,
        load_in_16bit: bool = False,
        full_finetuning: bool = False,
        token: str | None = None,
        device_map: Any = "sequential",
        trust_remote_code: bool = False,
        use_gradient_checkpointing: bool | str = "unsloth",
        revision: str | None = None,
        attn_implementation: str | None = None,
        fast_path: bool = True,
        **kwargs: Any,
    ) -> tuple[PreTrainedModel, Any]:
        """Load ``model_name`` (a folder or Hub id) and its processor; returns ``(model, processor)``.

        4-bit is NF4 with double quantization on the language tower; the vision tower and projector stay in
        ``dtype`` (16-bit on GPU). A folder holding a saved LoRA adapter loads its base and attaches the adapter.
        """
        cfg = load_config(model_name, max_seq_length, dtype, load_in_4bit, load_in_8bit, load_in_16bit,
                          full_finetuning, trust_remote_code)
        source = source_of(model_name, token, revision, trust_remote_code)
        if not is_vision_config(source.config):
            raise ValueError(f"model_name: {cfg.model_name!r} is a text model ({type(source.config).__name__}, no "
                             "vision tower); load it with FastLanguageModel (or FastModel)")
        if attn_implementation is not None:
            kwargs["attn_implementation"] = attn_implementation

        def processor(folder: str) -> Any:
            return load_processor(folder, token=token, revision=revision, trust_remote_code=trust_remote_code)

        return load_pretrained(source, cfg, AutoModelForImageTextToText, processor, quant_skip=QUANT_SKIP,
                               fast_path=fast_path, device_map=device_map, token=token, revision=revision,
                               use_gradient_checkpointing=use_gradient_checkpointing, **kwargs)

    @staticmethod
    def get_peft_model(
        model: PreTrainedModel,
        r: int = 16,
        target_modules: str | Sequence[str] | None = None,
        lora_alpha: float = 16,
        lora_dropout: float = 0.0,
        bias: str = "none",
        finetune_vision_layers: bool = True,
        finetune_language_layers: bool = True,
        finetune_attention_modules: bool = True,
        finetune_mlp_modules: bool = True,
        layers_to_transform: list[int] | int | None = None,
        use_gradient_checkpointing: bool | str = "unsloth",
        random_state: int = 3407,
        use_rslora: bool = False,
        modules_to_save: list[str] | None = None,
        init_lora_weights: Any = True,
        loftq_config: Any = None,
        use_dora: bool = False,
        **kwargs: Any,
    ) -> PeftModel:
        """Add LoRA adapters on the layers the four ``finetune_*`` switches select (or ``target_modules``).

        ``target_modules`` (a list of layer names or a regex over full module names) overrides the switches. The
        vision side is the vision tower and the projector; attention and MLP are the blocks' attention and MLP
        linears (the projector counts as MLP). Returns a ``peft.PeftModel``.
        """
        if isinstance(model, PeftModel):
            logger.warning("fasttune: the model already has LoRA adapters; returning it unchanged")
            return model
        if target_modules is None or target_modules == "all-linear" or (
                not isinstance(target_modules, str) and list(target_modules) == list(DEFAULT_TARGET_MODULES)):
            if not has_vision_tower(model):
                raise ValueError(f"model: {type(model).__name__} has no vision tower; use "
                                 "FastLanguageModel.get_peft_model for text models")
            target_modules, chosen = lora_targets(model, finetune_vision_layers, finetune_language_layers,
                                                  finetune_attention_modules, finetune_mlp_modules)
            logger.info("fasttune: LoRA on %d layers (vision=%s, language=%s, attention=%s, mlp=%s)", len(chosen),
                        finetune_vision_layers, finetune_language_layers, finetune_attention_modules,
                        finetune_mlp_modules)
        settings = LoraSettings(r, lora_alpha, lora_dropout, bias, target_modules, use_gradient_checkpointing,
                                random_state, use_rslora, use_dora, modules_to_save, layers_to_transform,
                                init_lora_weights)
        extra = {"loftq_config": loftq_config} if loftq_config else {}
        return add_lora(model, settings, **extra, **kwargs)

    @staticmethod
    def for_inference(model: PreTrainedModel) -> PreTrainedModel:
        """Eval mode, no checkpointing, KV cache on, left padding (for batched ``generate``)."""
        return modes.for_inference(model)

    @staticmethod
    def for_training(model: PreTrainedModel, use_gradient_checkpointing: bool | str | None = None) -> PreTrainedModel:
        """Undo ``for_inference``: train mode, checkpointing as before, KV cache off, right padding."""
        return modes.for_training(model, use_gradient_checkpointing)
