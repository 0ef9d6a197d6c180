"""Save a LoRA model as a plain transformers folder: merged 16-bit, merged and re-quantized 4-bit, or adapters only.

    save_pretrained_merged(model, "out", tokenizer, save_method="merged_16bit")

writes sharded safetensors (+ index), config.json (quantization removed, dtype set), generation_config.json and the
tokenizer with its chat template, into a scratch folder that is renamed onto ``out`` only once everything is written
and every merged tensor was checked for NaN/inf.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors.torch import save_file
from torch import nn

from .atomic import atomic_directory
from .merge import base_model_of, merged_state_dict, unties_embeddings

logger = logging.getLogger(__name__)

SAVE_METHODS = ("merged_16bit", "merged_4bit_forced", "lora")
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def _resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"dtype: {dtype!r} is not supported; choose one of {sorted(_DTYPES)}")
    return _DTYPES[dtype]


def write_safetensors(state: dict[str, torch.Tensor], folder: Path, max_shard_size: int | str = "5GB") -> list[str]:
    """Write ``state`` as ``model.safetensors`` or ``model-0000i-of-0000n.safetensors`` + index. Returns file names."""
    split = split_torch_state_dict_into_shards(state, max_shard_size=max_shard_size)
    for filename, names in split.filename_to_tensors.items():
        shard = {n: state[n].contiguous() for n in names}
        save_file(shard, str(folder / filename), metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
                 "weight_map": split.tensor_to_filename}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True))
    return sorted(split.filename_to_tensors)


def _write_config(base: nn.Module, folder: Path, dtype: torch.dtype, untied: bool) -> None:
    config = copy.deepcopy(base.config)
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)
    config.dtype = dtype
    if untied:
        config.tie_word_embeddings = False
    config.save_pretrained(folder)
    generation = getattr(base, "generation_config", None)
    if generation is not None:
        generation.save_pretrained(folder)


def _write_tokenizer(tokenizer: Any, folder: Path) -> None:
    if tokenizer is None:
        logger.warning("save: no tokenizer given; the folder will hold no tokenizer or chat template")
        return
    tokenizer.save_pretrained(folder)


def write_merged_16bit(model: nn.Module, folder: Path, tokenizer: Any = None, max_shard_size: int | str = "5GB",
                       dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Merge and write a loadable transformers folder into ``folder`` (not atomic by itself). Returns the state."""
    base = base_model_of(model)
    state = merged_state_dict(model, dtype=dtype)
    out_dtype = next(t.dtype for t in state.values() if t.is_floating_point())
    write_safetensors(state, folder, max_shard_size)
    _write_config(base, folder, out_dtype, unties_embeddings(base, state))
    _write_tokenizer(tokenizer, folder)
    return state


def _write_4bit(model: nn.Module, folder: Path, tokenizer: Any, max_shard_size: int | str) -> None:
    """Merge in 16-bit, reload that with bitsandbytes NF4 and save the quantized model."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    with tempfile.TemporaryDirectory(dir=folder.parent) as scratch:
        write_merged_16bit(model, Path(scratch), None, max_shard_size, dtype=torch.bfloat16)
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=torch.bfloat16)
        device = next(base_model_of(model).parameters()).device
        reloaded = AutoModelForCausalLM.from_pretrained(scratch, quantization_config=quant, dtype=torch.bfloat16,
                                                        device_map=str(device))
        reloaded.save_pretrained(folder, max_shard_size=max_shard_size)
    _write_tokenizer(tokenizer, folder)


def save_pretrained_merged(
    model: nn.Module,
    save_directory: str | os.PathLike,
    tokenizer: Any = None,
    save_method: str = "merged_16bit",
    max_shard_size: int | str = "5GB",
    **kw: Any,
) -> Path:
    """Save ``model`` (a peft LoRA model, base bf16/fp32 or bitsandbytes 4-bit) to ``save_directory``.

    save_method: ``"merged_16bit"`` (dense merged weights in the model's dtype, or ``dtype=``), ``"merged_4bit_forced"``
    (merged, then re-quantized to bitsandbytes NF4: lossy, for loading with bitsandbytes only) or ``"lora"`` (the
    adapters alone, peft format). Extra keywords: ``dtype`` ("float16" | "bfloat16" | "float32" or a torch dtype),
    ``push_to_hub`` / ``token`` / ``private`` (then also uploaded to the Hub repo named ``save_directory``).
    Returns the folder.
    """
    allowed = {"dtype", "push_to_hub", "token", "private", "commit_message"}
    unknown = sorted(set(kw) - allowed)
    if unknown:
        raise TypeError(f"save_pretrained_merged: unexpected keyword(s) {unknown}; accepted: {sorted(allowed)}")
    if save_method == "merged_4bit":
        raise ValueError("save_method: 'merged_4bit' re-quantizes merged weights (lossy, not for GGUF or vLLM); "
                         "pass save_method='merged_4bit_forced' if that is really wanted, else 'merged_16bit'")
    if save_method not in SAVE_METHODS:
        raise ValueError(f"save_method: {save_method!r} is not supported; choose one of {list(SAVE_METHODS)}")
    dtype = _resolve_dtype(kw.get("dtype"))
    target = Path(save_directory)
    with atomic_directory(target) as scratch:
        if save_method == "merged_16bit":
            write_merged_16bit(model, scratch, tokenizer, max_shard_size, dtype)
        elif save_method == "merged_4bit_forced":
            _write_4bit(model, scratch, tokenizer, max_shard_size)
        else:
            if not hasattr(model, "peft_config"):
                raise ValueError("save_method='lora': the model has no LoRA adapters (not a peft model)")
            model.save_pretrained(scratch)
            _write_tokenizer(tokenizer, scratch)
    logger.info("save_pretrained_merged: wrote %s (%s)", target, save_method)
    if kw.get("push_to_hub"):
        from .hub import upload_folder

        upload_folder(target, str(save_directory), token=kw.get("token"), private=kw.get("private"),
                      commit_message=kw.get("commit_message"))
    return target
