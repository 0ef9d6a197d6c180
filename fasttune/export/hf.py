"""Save a LoRA model as a plain transformers folder: merged 16-bit, merged and re-quantized 4-bit, or adapters only.

    save_pretrained_merged(model, "out", tokenizer, save_method="merged_16bit")

writes sharded safetensors (+ index), config.json (quantization removed, dtype set), generation_config.json and the
tokenizer with its chat template, into a scratch folder that is installed into ``out`` only once everything is written
and every merged tensor (or, for ``save_method="lora"``, every adapter tensor) was checked for NaN/inf.

Saving into a folder that already exists replaces only the files the save writes (see ``atomic.py`` for how a crash
at any instant is survived). Files other exports left there that would be loaded with the new one (``is_export_file``:
other weights, indexes, an adapter beside merged weights, tokenizer files this save does not write) make the save
refuse unless ``overwrite=True``; everything else (notes, ``checkpoint-*`` folders, GGUF files) stays.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors.torch import save_file
from torch import nn

from ..distributed import one_writer
from ..lora.unwrap import base_model
from .atomic import atomic_directory
from .hub import split_push_kwargs, upload_folder
from .merge import NonFiniteWeightError, merged_state_dict, unties_embeddings

logger = logging.getLogger(__name__)

SAVE_METHODS = ("merged_16bit", "merged_4bit_forced", "lora")
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}

# What a transformers / peft / vLLM loader picks up from a folder: these belong to "the export" in it.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".h5", ".msgpack", ".safetensors.index.json", ".bin.index.json")
_NOT_WEIGHTS = ("training_args.bin",)  # the Trainer's pickled arguments, nothing loads it as weights
MODEL_FILES = ("config.json", "generation_config.json", "adapter_config.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model",
                   "chat_template.jinja", "chat_template.json", "additional_chat_templates")
_MERGED_FILES = ("config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json")
_SHARD_RE = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
_ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def is_export_file(name: str) -> bool:
    """True for a top-level name that a loader reads as part of a model folder: weights (``*.safetensors``, ``*.bin``
    but the Trainer's ``training_args.bin``, ``*.h5``, ``*.msgpack``), weight indexes, ``config.json``,
    ``generation_config.json``, ``adapter_config.json`` and tokenizer files (``TOKENIZER_FILES``). Such a file left
    by an earlier export and not rewritten by a save would shadow or mix with the new export: transformers loads an
    ``adapter_config.json`` as an adapter, vLLM loads every ``*.safetensors``, an old index points at old shards, an old
    ``chat_template.jinja`` overrides the new tokenizer's template."""
    if name in MODEL_FILES or name in TOKENIZER_FILES:
        return True
    return name.endswith(_WEIGHT_SUFFIXES) and name not in _NOT_WEIGHTS


def _may_write(save_method: str, with_tokenizer: bool) -> Callable[[str], bool]:
    """The names a save of this kind can write (used to refuse a conflicting folder before the slow work)."""
    def may_write(name: str) -> bool:
        if with_tokenizer and name in TOKENIZER_FILES:
            return True
        if save_method == "lora":
            return name in _ADAPTER_FILES
        return name in _MERGED_FILES or bool(_SHARD_RE.fullmatch(name))
    return may_write


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
    base = base_model(model)
    state = merged_state_dict(model, dtype=dtype)
    out_dtype = next(t.dtype for t in state.values() if t.is_floating_point())
    write_safetensors(state, folder, max_shard_size)
    _write_config(base, folder, out_dtype, unties_embeddings(base, state))
    _write_tokenizer(tokenizer, folder)
    return state


def _write_4bit(model: nn.Module, folder: Path, tokenizer: Any, max_shard_size: int | str) -> None:
    """Merge in 16-bit, reload that with bitsandbytes NF4 and save the quantized model.

    The 16-bit copy lives inside ``folder`` (the save's scratch), so a killed save leaves nothing else behind."""
    from transformers import AutoModelForCausalLM

    from ..quant.config import nf4_config

    dense = folder / ".merged-16bit"
    dense.mkdir()
    write_merged_16bit(model, dense, None, max_shard_size, dtype=torch.bfloat16)
    quant = nf4_config(torch.bfloat16, skip_modules=(), quant_storage=torch.uint8)  # every linear, the head too
    device = next(base_model(model).parameters()).device
    reloaded = AutoModelForCausalLM.from_pretrained(dense, quantization_config=quant, dtype=torch.bfloat16,
                                                    device_map=str(device))
    reloaded.save_pretrained(folder, max_shard_size=max_shard_size)
    shutil.rmtree(dense)
    _write_tokenizer(tokenizer, folder)


def _check_adapters_finite(model: nn.Module) -> None:
    """Raise ``NonFiniteWeightError`` naming the first adapter tensor holding NaN/inf (checked before writing)."""
    from peft import get_peft_model_state_dict

    for adapter in model.peft_config:
        for name, tensor in get_peft_model_state_dict(model, adapter_name=adapter).items():
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                nans, infs = int(torch.isnan(tensor).sum()), int(torch.isinf(tensor).sum())
                raise NonFiniteWeightError(
                    f"save_method='lora': adapter {adapter!r} tensor {name} has {nans} NaN and {infs} inf values; "
                    "nothing was written. The adapter is broken (check the training loss for divergence)."
                )


def _write_lora(model: nn.Module, folder: Path, tokenizer: Any, target: Path) -> None:
    """peft's adapter folder. A README.md already in ``target`` is kept (copied over peft's model card, so the
    folder can still be swapped in whole)."""
    model.save_pretrained(folder)
    if (target / "README.md").is_file():
        shutil.copyfile(target / "README.md", folder / "README.md")
    _write_tokenizer(tokenizer, folder)


@one_writer
def save_pretrained_merged(
    model: nn.Module,
    save_directory: str | os.PathLike,
    tokenizer: Any = None,
    save_method: str = "merged_16bit",
    max_shard_size: int | str = "5GB",
    *,
    overwrite: bool = False,
    **kw: Any,
) -> Path:
    """Save ``model`` (a peft LoRA model, base bf16/fp32 or bitsandbytes 4-bit) to ``save_directory``.

    save_method: ``"merged_16bit"`` (dense merged weights in the model's dtype, or ``dtype=``), ``"merged_4bit_forced"``
    (merged, then re-quantized to bitsandbytes NF4: lossy, for loading with bitsandbytes only) or ``"lora"`` (the
    adapters alone, peft format). Extra keywords: ``dtype`` ("float16" | "bfloat16" | "float32" or a torch dtype),
    ``push_to_hub`` / ``token`` / ``private`` (then also uploaded to the Hub repo named ``save_directory``).

    An existing folder keeps every file the save does not write. It is refused (``ExportConflictError``, nothing
    written) when it holds export files this save does not write (``is_export_file``: other or stale weights and
    indexes, an adapter beside merged weights or merged weights beside an adapter, tokenizer files) or when it is the
    current working directory or above it; ``overwrite=True`` then removes those export files (only them) and
    saves. Returns the folder.
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
    if not isinstance(overwrite, bool):
        raise TypeError(f"overwrite: expected True or False, got {overwrite!r}")
    dtype = _resolve_dtype(kw.get("dtype"))
    if save_method == "lora":
        if not hasattr(model, "peft_config"):
            raise ValueError("save_method='lora': the model has no LoRA adapters (not a peft model)")
        _check_adapters_finite(model)
    target = Path(save_directory)
    with atomic_directory(target, overwrite=overwrite, managed=is_export_file,
                          may_write=_may_write(save_method, tokenizer is not None)) as scratch:
        if save_method == "merged_16bit":
            write_merged_16bit(model, scratch, tokenizer, max_shard_size, dtype)
        elif save_method == "merged_4bit_forced":
            _write_4bit(model, scratch, tokenizer, max_shard_size)
        else:
            _write_lora(model, scratch, tokenizer, target)
    logger.info("save_pretrained_merged: wrote %s (%s)", target, save_method)
    if kw.get("push_to_hub"):
        upload_folder(target, str(save_directory), token=kw.get("token"), private=kw.get("private"),
                      commit_message=kw.get("commit_message"))
    return target


@one_writer
def push_to_hub_merged(model: nn.Module, repo_id: str, tokenizer: Any = None, save_method: str = "merged_16bit",
                       token: str | None = None, private: bool | None = None, **kw: Any) -> str:
    """``save_pretrained_merged`` into a temporary folder, then upload it to ``repo_id``; returns the commit URL.

    Extra keywords: ``endpoint``, ``commit_message``, ``revision`` (upload) and those of ``save_pretrained_merged``.
    """
    push, save_kw = split_push_kwargs(dict(kw))
    with tempfile.TemporaryDirectory() as scratch:
        folder = save_pretrained_merged(model, Path(scratch) / "model", tokenizer, save_method=save_method, **save_kw)
        return upload_folder(folder, repo_id, token=token, private=private, **push)
