"""vLLM-style LoRA handles: ``model.save_lora(path)``, ``model.load_lora(path) -> LoRARequest`` and generation with
a saved adapter swapped in (``fast_generate(..., lora_request=...)``).

vLLM keeps base weights and applies an adapter per request; fasttune's engine runs the model in place, so a request's
adapter is *copied into* the model's active adapter for the call and the previous values are copied back afterwards
(nothing is merged; the fused LoRA kernels keep reading the same parameters). That needs the saved adapter to have
the live adapter's shape: same rank, alpha and target modules, which is what GRPO notebooks save and load.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..distributed import one_writer
from ..state import model_state

_IDS = itertools.count(1)
_ADAPTER_CONFIG = "adapter_config.json"
_ADAPTER_WEIGHTS = "adapter_model.safetensors"


@dataclass
class LoRARequest:
    """vLLM's ``LoRARequest`` fields (``lora_name``, ``lora_int_id``, ``lora_path``) plus the loaded tensors."""

    lora_name: str
    lora_int_id: int
    lora_path: str
    config: dict[str, Any] = field(default_factory=dict, repr=False)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)


@one_writer
def save_lora(model: nn.Module, save_directory: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Save the LoRA adapters alone (peft format, atomically, NaN-checked); Unsloth's ``model.save_lora``."""
    from fasttune.export.hf import save_pretrained_merged

    return save_pretrained_merged(model, save_directory, None, save_method="lora", overwrite=overwrite)


def load_lora(model: nn.Module, lora_path: str | os.PathLike, load_tensors: bool = False) -> LoRARequest:
    """A handle on the adapter saved in ``lora_path``, checked against ``model``'s live adapter (Unsloth's
    ``model.load_lora``). ``load_tensors`` is accepted for Unsloth's signature; tensors are always read, so that a
    mismatch is reported here rather than mid-generation."""
    folder = Path(lora_path)
    if not (folder / _ADAPTER_CONFIG).is_file() or not (folder / _ADAPTER_WEIGHTS).is_file():
        raise FileNotFoundError(f"lora_path: {str(folder)!r} holds no saved adapter (expected {_ADAPTER_CONFIG} and "
                                f"{_ADAPTER_WEIGHTS}; save one with model.save_lora(path))")
    request = LoRARequest(folder.name, next(_IDS), str(folder), *_read_adapter(folder))
    _check_request(model, request)
    return request


def _read_adapter(folder: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """The adapter's config and tensors; a damaged file, or a tensor holding NaN / inf (generation would then emit
    garbage; ``save_lora`` refuses to write such tensors), is a ``ValueError`` naming the file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    config_path, weights_path = folder / _ADAPTER_CONFIG, folder / _ADAPTER_WEIGHTS
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"lora_path: {str(config_path)!r} is not valid JSON ({error}); the save is damaged: save "
                         "the adapter again with model.save_lora(path)") from error
    try:
        tensors = load_file(str(weights_path))
    except SafetensorError as error:
        raise ValueError(f"lora_path: {str(weights_path)!r} cannot be read ({error}); the file is damaged or "
                         "truncated: save the adapter again with model.save_lora(path)") from error
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"lora_path: tensor {name} in {str(weights_path)!r} has {int(torch.isnan(tensor).sum())} "
                             f"NaN and {int(torch.isinf(tensor).sum())} inf values; this adapter cannot be used (was "
                             "its training diverging?)")
    return config, tensors


def _live_adapter(model: nn.Module) -> tuple[str, Any]:
    peft_config = getattr(model, "peft_config", None)
    if not peft_config:
        raise ValueError("lora_request: the model has no LoRA adapters to swap (it is not a peft model); call "
                         "FastLanguageModel.get_peft_model first")
    name = getattr(model, "active_adapter", None) or next(iter(peft_config))
    return name, peft_config[name]


def _live_parameters(model: nn.Module, adapter: str) -> dict[str, nn.Parameter]:
    """The live adapter's tensors under the names peft saves them with (adapter name removed)."""
    marker = f".{adapter}."
    return {name.replace(marker, "."): param for name, param in model.named_parameters()
            if "lora_" in name and marker in name}


def _check_request(model: nn.Module, request: LoRARequest) -> None:
    adapter, live = _live_adapter(model)
    state = model_state(model)
    max_rank = state.rl.max_lora_rank if state is not None else None
    rank = request.config.get("r")
    if max_rank is not None and rank is not None and rank > max_rank:
        raise ValueError(f"lora_request: the adapter in {request.lora_path!r} has rank {rank}, above the model's "
                         f"max_lora_rank={max_rank} (from_pretrained); load the model with max_lora_rank >= {rank}")
    for key in ("r", "lora_alpha", "use_rslora"):
        if key in request.config and request.config[key] != getattr(live, key, None):
            raise ValueError(f"lora_request: {request.lora_path!r} has {key}={request.config[key]!r} but the model's "
                             f"adapter has {key}={getattr(live, key, None)!r}; only adapters of the same shape can "
                             "be swapped in (save and load adapters of this model)")
    params = _live_parameters(model, adapter)
    missing = sorted(set(params) - set(request.tensors))
    extra = sorted(set(request.tensors) - set(params))
    if missing or extra:
        raise ValueError(f"lora_request: {request.lora_path!r} does not match the model's adapter: "
                         f"{len(missing)} tensors missing (e.g. {missing[:2]}), {len(extra)} unexpected "
                         f"(e.g. {extra[:2]})")
    for name, param in params.items():
        if tuple(request.tensors[name].shape) != tuple(param.shape):
            raise ValueError(f"lora_request: tensor {name} has shape {tuple(request.tensors[name].shape)} in "
                             f"{request.lora_path!r}, the model's has {tuple(param.shape)}")


@contextlib.contextmanager
def adapter_for(model: nn.Module, request: LoRARequest | None) -> Iterator[None]:
    """Run the block with ``request``'s adapter in place of the live one, or with adapters off when ``None``
    (vLLM's meaning: no ``lora_request`` = the base model). The live adapter's values are restored afterwards."""
    if request is None:
        disable = getattr(model, "disable_adapter", None)
        with disable() if disable is not None else contextlib.nullcontext():
            yield
        return
    if not isinstance(request, LoRARequest):
        raise TypeError(f"lora_request: expected the handle model.load_lora(path) returns, got "
                        f"{type(request).__name__}")
    _check_request(model, request)
    adapter, _ = _live_adapter(model)
    params = _live_parameters(model, adapter)
    saved = {name: param.detach().clone() for name, param in params.items()}
    try:
        with torch.no_grad():
            for name, param in params.items():
                param.copy_(request.tensors[name].to(param.device, param.dtype))
        yield
    finally:
        with torch.no_grad():
            for name, param in params.items():
                param.copy_(saved[name])
