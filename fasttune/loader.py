"""The public facades: ``FastLanguageModel`` (and ``FastModel``), with Unsloth's names and defaults.

They only orchestrate: the loading steps both facades share live in ``loading`` (option checks in ``config``, model
lookup in ``source``, quantized layers in ``quant``, LoRA injection in ``lora``, the fast forwards in ``patch``, the
model's state in ``state``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from . import modes
from .config import DEFAULT_TARGET_MODULES, LoraSettings, RLOptions
from .loading import add_lora, load_config, load_pretrained, source_of
from .lora.inject import targets_from_switches
from .models import get_family
from .source import ModelSource
from .vision.facade import FastVisionModel, is_vision_config
from .vision.towers import has_vision_tower

logger = logging.getLogger("fasttune")


class FastLanguageModel:
    """Load, adapt and switch modes of causal language models (Unsloth-compatible API)."""

    @staticmethod
    def from_pretrained(
        model_name: str | ModelSource = "unsloth/Llama-3.2-1B-Instruct",
        max_seq_length: int = 2048,
        dtype: torch.dtype | str | None = None,
        load_in_4bit: bool = True,
        load_in_8bit: bool = False,
        load_in_16bit: bool = False,
        full_finetuning: bool = False,
        token: str | None = None,
        device_map: Any = "sequential",
        rope_scaling: dict | None = None,
        fix_tokenizer: bool = True,
        trust_remote_code: bool = False,
        use_gradient_checkpointing: bool | str = "unsloth",
        revision: str | None = None,
        fast_inference: bool = False,
        max_lora_rank: int | None = None,
        gpu_memory_utilization: float | None = None,
        attn_implementation: str | None = None,
        fast_path: bool = True,
        load_in_fp8: bool | str = False,
        qat_scheme: str | None = None,
        **kwargs: Any,
    ) -> tuple[PreTrainedModel, Any]:
        """Load ``model_name`` (a folder or Hub id) and its tokenizer, ready for LoRA/QLoRA or full fine-tuning.

        Returns ``(model, tokenizer)``. 4-bit is NF4 with double quantization (bitsandbytes storage, so a saved
        model stays loadable by transformers); its forward is fasttune's exact dequantize-and-multiply (see
        ``fasttune.quant``). A folder holding a saved LoRA adapter loads its base model and attaches the adapter.
        ``fast_path=True`` installs fasttune's fused forwards on this instance for supported families
        (``fasttune.patch.unpatch_model(model)`` undoes it). ``fast_inference`` / ``max_lora_rank`` /
        ``gpu_memory_utilization`` are Unsloth's RL options (see ``fasttune.config.RLOptions``); every model gets
        ``fast_generate``, ``save_lora`` and ``load_lora``. A GGUF file (``model.gguf``, a folder holding one, or
        transformers' ``gguf_file=`` beside a folder) is a base model too: dequantized once into a cached folder
        (``fasttune.gguf_source``), then loaded in 4-bit / 8-bit / 16-bit as asked. ``load_in_fp8`` (True / "row"
        or "block") stores the linear weights in float8 e4m3 with row or 128x128 block scales (``fasttune.quant.fp8``;
        it replaces the default 4-bit); a checkpoint stored in FP8 (``weight_scale_inv``) loads as stored.
        ``qat_scheme`` with ``full_finetuning=True`` trains every weight through that scheme's rounding
        (``fasttune.quant.qat``).
        """
        gguf_file = kwargs.pop("gguf_file", None)
        if gguf_file is not None:  # transformers' spelling: a folder and the GGUF file in it
            model_name = str(Path(model_name) / gguf_file)
        cfg = load_config(model_name, max_seq_length, dtype, load_in_4bit, load_in_8bit, load_in_16bit,
                          full_finetuning, trust_remote_code, load_in_fp8, qat_scheme)
        rl_options = RLOptions(fast_inference, max_lora_rank, gpu_memory_utilization)
        source = source_of(model_name, token, revision, trust_remote_code)
        if rope_scaling is not None:
            kwargs["rope_scaling"] = rope_scaling
        if attn_implementation is not None:  # None: transformers picks SDPA where the family supports it
            kwargs["attn_implementation"] = attn_implementation

        def tokenizer(folder: str) -> Any:
            return AutoTokenizer.from_pretrained(folder, token=token, revision=revision,
                                                 trust_remote_code=trust_remote_code)

        return load_pretrained(source, cfg, AutoModelForCausalLM, tokenizer, fast_path=fast_path,
                               device_map=device_map, token=token, revision=revision,
                               use_gradient_checkpointing=use_gradient_checkpointing, fix_tokenizer=fix_tokenizer,
                               rl=rl_options, **kwargs)

    @staticmethod
    def get_peft_model(
        model: PreTrainedModel,
        r: int = 16,
        target_modules: str | Sequence[str] = DEFAULT_TARGET_MODULES,
        lora_alpha: float = 16,
        lora_dropout: float = 0.0,
        bias: str = "none",
        layers_to_transform: list[int] | int | None = None,
        layers_pattern: str | None = None,
        use_gradient_checkpointing: bool | str = "unsloth",
        random_state: int = 3407,
        max_seq_length: int | None = None,
        use_rslora: bool = False,
        modules_to_save: list[str] | None = None,
        init_lora_weights: Any = True,
        loftq_config: Any = None,
        use_dora: bool = False,
        finetune_vision_layers: bool | None = None,
        finetune_language_layers: bool | None = None,
        finetune_attention_modules: bool | None = None,
        finetune_mlp_modules: bool | None = None,
        qat_scheme: str | None = None,
        **kwargs: Any,
    ) -> PeftModel:
        """Add LoRA adapters (through peft) and prepare the model for training.

        ``target_modules`` names must be linear layers of the model (the error lists them); Unsloth's default list
        also works on families with fused projections (phi3). ``finetune_*`` are ``FastModel``'s switches: given
        with the default ``target_modules``, attention/MLP pick the family's projections (a text model has no vision
        tower, so ``finetune_vision_layers`` changes nothing there). ``qat_scheme`` (Unsloth's "int4", "int8-int4",
        "fp8-int4", "fp8-fp8", or a GGUF type such as "q4_0", "q4_k_m") trains the adapters through the rounding of
        the merged weight (``fasttune.quant.qat``). Returns a ``peft.PeftModel``.
        """
        if isinstance(model, PeftModel):
            logger.warning("fasttune: the model already has LoRA adapters; returning it unchanged")
            return model
        switches = {k: v for k, v in (("finetune_vision_layers", finetune_vision_layers),
                                      ("finetune_language_layers", finetune_language_layers),
                                      ("finetune_attention_modules", finetune_attention_modules),
                                      ("finetune_mlp_modules", finetune_mlp_modules)) if v is not None}
        if switches:
            target_modules = _switch_targets(model, target_modules, switches)
        settings = LoraSettings(r, lora_alpha, lora_dropout, bias, target_modules, use_gradient_checkpointing,
                                random_state, use_rslora, use_dora, modules_to_save, layers_to_transform,
                                init_lora_weights, qat_scheme)
        extra = {k: v for k, v in (("layers_pattern", layers_pattern), ("loftq_config", loftq_config)) if v}
        return add_lora(model, settings, max_seq_length, **extra, **kwargs)

    @staticmethod
    def for_inference(model: PreTrainedModel) -> PreTrainedModel:
        """Eval mode, no checkpointing, KV cache on, left padding (for batched ``generate``)."""
        return modes.for_inference(model)

    @staticmethod
    def for_training(model: PreTrainedModel, use_gradient_checkpointing: bool | str | None = None) -> PreTrainedModel:
        """Undo ``for_inference``: train mode, checkpointing as before, KV cache off, right padding."""
        return modes.for_training(model, use_gradient_checkpointing)


def _switch_targets(model: PreTrainedModel, target_modules: Any, switches: dict[str, bool]) -> Any:
    """``target_modules`` for ``FastModel.get_peft_model``'s ``finetune_*`` switches (text models)."""
    if target_modules is not DEFAULT_TARGET_MODULES and list(target_modules) != list(DEFAULT_TARGET_MODULES):
        logger.warning("fasttune: target_modules=%r given; the finetune_* switches %s are not used", target_modules,
                       sorted(switches))
        return target_modules
    if switches.get("finetune_vision_layers"):
        logger.info("fasttune: finetune_vision_layers=True: %s has no vision tower; its language layers are adapted",
                    type(model).__name__)
    return targets_from_switches(get_family(model.config.model_type), has_vision_tower=False,
                                 **{k: v for k, v in switches.items()})


class FastModel(FastLanguageModel):
    """Unsloth's catch-all facade: ``FastVisionModel`` for vision-language models, else ``FastLanguageModel``."""

    @staticmethod
    def from_pretrained(model_name: str = "unsloth/gemma-3-4b-it", *args: Any, **kwargs: Any) -> tuple[Any, Any]:
        """Load a text model (returns ``(model, tokenizer)``) or a vision-language model (``(model, processor)``).

        The source is resolved once, here; the facade that loads it takes it as it is."""
        gguf_file = kwargs.pop("gguf_file", None)
        if gguf_file is not None:  # transformers' spelling: a folder and the GGUF file in it
            model_name = str(Path(model_name) / gguf_file)
        source = source_of(model_name, kwargs.get("token"), kwargs.get("revision"),
                           kwargs.get("trust_remote_code", False))
        if is_vision_config(source.config):
            return FastVisionModel.from_pretrained(source, *args, **kwargs)
        return FastLanguageModel.from_pretrained(source, *args, **kwargs)

    @staticmethod
    def get_peft_model(model: PreTrainedModel, *args: Any, **kwargs: Any) -> PeftModel:
        """``FastVisionModel.get_peft_model`` for a model with a vision tower, else ``FastLanguageModel``'s."""
        if not isinstance(model, PeftModel) and has_vision_tower(model):
            return FastVisionModel.get_peft_model(model, *args, **kwargs)
        return FastLanguageModel.get_peft_model(model, *args, **kwargs)
