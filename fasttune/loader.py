"""The public facades: ``FastLanguageModel`` (and ``FastModel``), with Unsloth's names and defaults.

They only orchestrate: option checks live in ``config``, model lookup in ``source``, quantized layers in ``quant``,
LoRA injection in ``lora``, the training-time patches in ``fast``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, PreTrainedModel

from . import modes
from .config import DEFAULT_TARGET_MODULES, LoadConfig, LoraSettings, RLOptions
from .device import default_device_map
from .lora import inject_lora
from .lora.inject import targets_from_switches
from .models import get_family
from .modes import finish_loading, finish_peft, prepare_tokenizer
from .patch import FAST_PATHS, patch_model
from .quant import patch_quantized_layers
from .quant.config import int8_config, nf4_config
from .source import resolve_source
from .vision.facade import FastVisionModel, is_vision_config
from .vision.towers import has_vision_tower

logger = logging.getLogger("fasttune")


def _quantization_config(cfg: LoadConfig) -> BitsAndBytesConfig | None:
    if cfg.quantization == "4bit":
        return nf4_config(cfg.dtype)
    if cfg.quantization == "8bit":
        return int8_config()
    return None


class FastLanguageModel:
    """Load, adapt and switch modes of causal language models (Unsloth-compatible API)."""

    @staticmethod
    def from_pretrained(
        model_name: str = "unsloth/Llama-3.2-1B-Instruct",
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
        (``fasttune.gguf_source``), then loaded in 4-bit / 8-bit / 16-bit as asked.
        """
        gguf_file = kwargs.pop("gguf_file", None)
        if gguf_file is not None:  # transformers' spelling: a folder and the GGUF file in it
            model_name = str(Path(model_name) / gguf_file)
        if full_finetuning and (load_in_4bit or load_in_8bit):
            logger.warning("fasttune: full_finetuning=True trains every weight, so the model loads in 16-bit, "
                           "not %s", "4-bit" if load_in_4bit else "8-bit")
        cfg = LoadConfig(model_name, max_seq_length, dtype, load_in_4bit, load_in_8bit, load_in_16bit,
                         full_finetuning, trust_remote_code)
        rl_options = RLOptions(fast_inference, max_lora_rank, gpu_memory_utilization)
        source = resolve_source(model_name, token=token, revision=revision, trust_remote_code=trust_remote_code)
        has_fast_path = source.config.get_text_config().model_type in FAST_PATHS
        if not has_fast_path:
            logger.warning("fasttune: %s (model_type %r) has no fast path; loading through the generic path",
                           type(source.config).__name__, source.config.model_type)
        if rope_scaling is not None:
            kwargs["rope_scaling"] = rope_scaling
        if attn_implementation is not None:  # None: transformers picks SDPA where the family supports it
            kwargs["attn_implementation"] = attn_implementation
        if fast_path and has_fast_path:  # no Hub kernels fetched at load: fasttune's forwards replace them
            kwargs.setdefault("use_kernels", False)  # (fasttune.patch.model's docstring)
        model = AutoModelForCausalLM.from_pretrained(
            source.base,
            dtype=cfg.dtype,
            quantization_config=_quantization_config(cfg),
            device_map=default_device_map() if device_map in ("sequential", "auto", None) else device_map,
            token=token,
            revision=revision,
            trust_remote_code=trust_remote_code,
            **kwargs,
        )
        patch_quantized_layers(model)
        if fast_path and has_fast_path:
            patch_model(model)
        tokenizer = AutoTokenizer.from_pretrained(
            source.tokenizer_source, token=token, revision=revision, trust_remote_code=trust_remote_code
        )
        if fix_tokenizer:
            prepare_tokenizer(tokenizer, max_seq_length)
        model.max_seq_length = max_seq_length
        model.fasttune_tokenizer = tokenizer
        model.max_lora_rank = rl_options.max_lora_rank
        model.fasttune_rl_options = rl_options  # read by fasttune.trl.GRPOTrainer (vLLM rollouts on CUDA)
        model = finish_loading(model, source.adapter, full_finetuning, use_gradient_checkpointing)
        return model, tokenizer

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
        **kwargs: Any,
    ) -> PeftModel:
        """Add LoRA adapters (through peft) and prepare the model for training.

        ``target_modules`` names must be linear layers of the model (the error lists them); Unsloth's default list
        also works on families with fused projections (phi3). ``finetune_*`` are ``FastModel``'s switches: given
        with the default ``target_modules``, attention/MLP pick the family's projections (a text model has no vision
        tower, so ``finetune_vision_layers`` changes nothing there). Returns a ``peft.PeftModel``.
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
        max_rank = getattr(model, "max_lora_rank", None)
        if max_rank is not None and isinstance(r, int) and r > max_rank:
            raise ValueError(f"r: {r} is above max_lora_rank={max_rank} given to from_pretrained; use r <= {max_rank} "
                             "or load with a larger max_lora_rank")
        settings = LoraSettings(r, lora_alpha, lora_dropout, bias, target_modules, use_gradient_checkpointing,
                                random_state, use_rslora, use_dora, modules_to_save, layers_to_transform,
                                init_lora_weights)
        extra = {k: v for k, v in (("layers_pattern", layers_pattern), ("loftq_config", loftq_config)) if v}
        spec = get_family(model.config.model_type)
        peft_model = inject_lora(model, settings, spec, **extra, **kwargs)
        if max_seq_length is not None:
            peft_model.max_seq_length = max_seq_length
        return finish_peft(peft_model, use_gradient_checkpointing)

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
        """Load a text model (returns ``(model, tokenizer)``) or a vision-language model (``(model, processor)``)."""
        source = resolve_source(model_name, token=kwargs.get("token"), revision=kwargs.get("revision"),
                                trust_remote_code=kwargs.get("trust_remote_code", False))
        if is_vision_config(source.config):
            return FastVisionModel.from_pretrained(model_name, *args, **kwargs)
        return FastLanguageModel.from_pretrained(model_name, *args, **kwargs)

    @staticmethod
    def get_peft_model(model: PreTrainedModel, *args: Any, **kwargs: Any) -> PeftModel:
        """``FastVisionModel.get_peft_model`` for a model with a vision tower, else ``FastLanguageModel``'s."""
        if not isinstance(model, PeftModel) and has_vision_tower(model):
            return FastVisionModel.get_peft_model(model, *args, **kwargs)
        return FastLanguageModel.get_peft_model(model, *args, **kwargs)
