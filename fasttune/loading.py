"""What both facades do to load a model and to add LoRA to it, written once.

``FastLanguageModel`` (loader.py) and ``FastVisionModel`` (vision/facade.py) differ in their options and in what they
load (a causal LM and its tokenizer, or a vision-language model and its processor, its vision tower kept out of
4-bit); the steps are the same and live here: options checked (:class:`fasttune.config.LoadConfig`), the source
resolved once (a folder, a Hub id, a GGUF file, an adapter folder: :mod:`fasttune.source`), one bitsandbytes config,
transformers' load, the fast path, the model's :class:`~fasttune.state.FastState`, and
:func:`fasttune.modes.finish_loading`. ``add_lora`` is both facades' ``get_peft_model`` after the target choice.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from peft import PeftModel
from transformers import BitsAndBytesConfig, PreTrainedModel

from .config import LoadConfig, LoraSettings, RLOptions
from .device import default_device_map
from .lora import inject_lora
from .models import get_family
from .modes import finish_loading, finish_peft, prepare_tokenizer
from .patch import FAST_PATHS, patch_model
from .quant import patch_quantized_layers
from .quant.config import int8_config, mxfp4_dequantized, nf4_config, stored_quantization
from .quant.experts import quantize_experts
from .quant.fp8 import (
    checkpoint_folder,
    convert_to_fp8,
    dequantize_fp8_layers,
    fp8_checkpoint_block,
    granularity_of,
    load_fp8_checkpoint,
)
from .quant.qat import apply_qat, check_qat_model, normalize_scheme
from .source import ModelSource, resolve_source
from .state import FastState, attach_state, model_state

logger = logging.getLogger("fasttune")


def load_config(model_name: str | ModelSource, max_seq_length: int, dtype: Any, load_in_4bit: bool,
                load_in_8bit: bool, load_in_16bit: bool, full_finetuning: bool,
                trust_remote_code: bool, load_in_fp8: Any = False, qat_scheme: str | None = None) -> LoadConfig:
    """The checked loading options (every problem at once); full fine-tuning loads 16-bit, which is said."""
    if full_finetuning and (load_in_4bit or load_in_8bit) and load_in_fp8 in (False, None):
        logger.warning("fasttune: full_finetuning=True trains every weight, so the model loads in 16-bit, "
                       "not %s", "4-bit" if load_in_4bit else "8-bit")
    name = model_name.base if isinstance(model_name, ModelSource) else model_name
    return LoadConfig(name, max_seq_length, dtype, load_in_4bit, load_in_8bit, load_in_16bit, full_finetuning,
                      trust_remote_code, load_in_fp8, qat_scheme)


def source_of(model_name: str | ModelSource, token: str | None, revision: str | None,
              trust_remote_code: bool) -> ModelSource:
    """Where the model comes from; a source already resolved (``FastModel`` resolves once, then picks the facade)
    is used as it is."""
    if isinstance(model_name, ModelSource):
        return model_name
    return resolve_source(model_name, token=token, revision=revision, trust_remote_code=trust_remote_code)


def quantization_config(cfg: LoadConfig, skip_modules: Sequence[str] | None = None) -> BitsAndBytesConfig | None:
    """bitsandbytes' config for ``cfg``'s quantization; ``skip_modules`` stay in 16-bit (default: the output head)."""
    skip = {} if skip_modules is None else {"skip_modules": skip_modules}
    if cfg.quantization == "4bit":
        return nf4_config(cfg.dtype, **skip)
    if cfg.quantization == "8bit":
        return int8_config(**skip)
    return None


def load_pretrained(source: ModelSource, cfg: LoadConfig, auto_class: Any, load_tokenizer: Callable[[str], Any], *,
                    quant_skip: Sequence[str] | None = None, fast_path: bool = True, device_map: Any = "sequential",
                    token: str | None = None, revision: str | None = None, use_gradient_checkpointing: Any = "unsloth",
                    fix_tokenizer: bool = True, rl: RLOptions | None = None, **kwargs: Any) -> tuple[Any, Any]:
    """Load ``source`` with ``auto_class`` and its tokenizer (``load_tokenizer(folder)``: a tokenizer, or a processor
    holding one); returns ``(model, tokenizer or processor)``, the model patched, its state attached and ready to
    train (:func:`fasttune.modes.finish_loading`). ``kwargs`` go to transformers' ``from_pretrained``."""
    text_type = source.config.get_text_config().model_type
    has_fast_path = text_type in FAST_PATHS
    if not has_fast_path:
        logger.warning("fasttune: %s (model_type %r) has no fast path; it loads and trains through transformers' "
                       "forward", type(source.config).__name__, text_type)
    if fast_path and has_fast_path:  # no Hub kernels fetched at load: fasttune's forwards replace them
        kwargs.setdefault("use_kernels", False)  # (fasttune.patch.model's docstring)
    quantization = quantization_config(cfg, quant_skip)
    if stored_quantization(source.config) == "mxfp4":  # gpt-oss's releases: experts stored in MXFP4
        quantization = mxfp4_dequantized()
        if cfg.quantization is not None:
            logger.warning("fasttune: %s is stored in MXFP4: its experts load dequantized%s; the other layers stay "
                           "16-bit (one quantization per load)", type(source.config).__name__,
                           " and are packed to NF4" if cfg.quantization == "4bit" else "")
    fp8_stored = fp8_checkpoint_block(source.config) is not None
    if fp8_stored:  # transformers would dequantize it (and cannot, for shapes its grid does not divide): we load it
        kwargs["config"] = _without_quantization_config(source.config)
    with read_checkpoints_without_mmap(_narrowing(source.config, cfg.dtype)):
        model = auto_class.from_pretrained(
            source.base,
            dtype=cfg.dtype,
            quantization_config=quantization,
            device_map=default_device_map() if device_map in ("sequential", "auto", None) else device_map,
            token=token,
            revision=revision,
            trust_remote_code=cfg.trust_remote_code,
            **kwargs,
        )
    fp8 = _load_fp8(model, source, cfg, fp8_stored, token, revision, quant_skip)
    patch_quantized_layers(model)
    spec = get_family(text_type)
    if cfg.quantization == "4bit" and spec is not None and spec.moe is not None:  # bitsandbytes skips 3-D experts
        quantize_experts(model, (spec.moe.gate_up, spec.moe.down))
    if cfg.qat_scheme is not None:  # full fine-tuning; before the fast forwards, which fall back to its forward
        apply_qat(model, cfg.qat_scheme)
    if fast_path and has_fast_path:
        patch_model(model)
    loaded = load_tokenizer(source.tokenizer_source)
    tokenizer = getattr(loaded, "tokenizer", loaded)  # a processor holds its tokenizer
    if fix_tokenizer:
        prepare_tokenizer(tokenizer, cfg.max_seq_length)  # right padding now; the padding side follows the mode
    attach_state(model, FastState(cfg.max_seq_length, tokenizer, rl if rl is not None else RLOptions(), fp8=fp8,
                                  qat_scheme=None if cfg.qat_scheme is None else normalize_scheme(cfg.qat_scheme)))
    model = finish_loading(model, source.adapter, cfg.full_finetuning, use_gradient_checkpointing)
    return model, loaded


_READ_LOCK = threading.Lock()


def _narrowing(config: Any, dtype: Any) -> bool:
    """Whether the load converts the checkpoint to a narrower float dtype (fp32 files into bf16/fp16)."""
    import torch

    stored = getattr(config, "dtype", None) or getattr(config.get_text_config(), "dtype", None)
    if isinstance(stored, str):
        stored = getattr(torch, stored, None)
    return (isinstance(stored, torch.dtype) and isinstance(dtype, torch.dtype) and stored.is_floating_point
            and dtype.is_floating_point and dtype.itemsize < stored.itemsize)


@contextlib.contextmanager
def read_checkpoints_without_mmap(enabled: bool = True) -> Iterator[None]:
    """Inside: transformers reads safetensors checkpoints tensor by tensor (``pread``) instead of mapping them.

    transformers 5 maps each checkpoint file and converts tensor by tensor; every page it touched stays in the
    process's resident set until loading ends, so loading Gemma-3-270M's fp32 folder into bf16 peaks at imports +
    the whole 1.03 GiB file + the model (2.06 GiB; 1.07 after). Read with ``pread`` (safetensors' other backend, the
    one transformers itself picks on Windows and MPS) each tensor lives only while it is converted: the peak is
    imports + the model + the largest tensor (1.81 GiB), the weights bit-identical (tests/foundation/test_loader.py).
    transformers offers no switch for it (``disable_mmap`` reads whole files into memory, worse), so its module's
    ``safe_open`` is wrapped for the duration of one load, under a lock; Linux and macOS only (where it maps).
    Only when the load narrows the dtype (``enabled``): loading fp32 files as fp32 and then sharding them (FSDP2,
    bench/bench_fsdp2_memory.py) peaked 0.14 GiB higher read than mapped (the read buffers become the parameters,
    and their heap holes stay after sharding)."""
    import transformers.modeling_utils as modeling_utils

    original = getattr(modeling_utils, "safe_open", None)
    if not enabled or original is None or sys.platform == "win32":
        yield
        return

    def safe_open(filename, framework, device="cpu", *args, backend=None, **kwargs):
        if backend in (None, "mmap") and str(device) == "cpu":
            backend = "pread"
        return original(filename, framework, device, *args, **({"backend": backend} if backend else {}), **kwargs)

    with _READ_LOCK:
        modeling_utils.safe_open = safe_open
        try:
            yield
        finally:
            modeling_utils.safe_open = original


def _without_quantization_config(config: Any) -> Any:
    config = copy.deepcopy(config)
    del config.quantization_config
    return config


def _load_fp8(model: Any, source: ModelSource, cfg: LoadConfig, stored: bool, token: str | None,
              revision: str | None, quant_skip: Sequence[str] | None) -> str | None:
    """Make the linear layers FP8 as asked (``cfg.load_in_fp8``) or as stored (an FP8 checkpoint: its bytes and
    block scales, exactly; dequantized exactly to ``cfg.dtype`` when 16-bit or full fine-tuning is asked). Returns
    the granularity ("row" / "block") or None."""
    if stored:
        count = load_fp8_checkpoint(model, checkpoint_folder(source.base, token, revision), cfg.dtype)
        if cfg.full_finetuning or cfg.load_in_16bit:
            dequantize_fp8_layers(model)
            logger.info("fasttune: the FP8 checkpoint's %d linear layers dequantized to %s", count, cfg.dtype)
            return None
        if cfg.quantization not in (None, "fp8"):
            logger.warning("fasttune: %s is stored in FP8 (128x128 block scales); it loads as stored, not in %s",
                           source.base, cfg.quantization)
        return "block"
    if cfg.quantization != "fp8":
        return None
    granularity = granularity_of(cfg.load_in_fp8)
    skip = tuple(quant_skip) if quant_skip is not None else ()
    count = convert_to_fp8(model, granularity, cfg.dtype, skip)
    logger.info("fasttune: %d linear layers stored in float8 e4m3 (%s scales)", count, granularity)
    return granularity


def add_lora(model: PreTrainedModel, settings: LoraSettings, max_seq_length: int | None = None,
             **kwargs: Any) -> PeftModel:
    """LoRA through peft on ``settings.target_modules`` (the facades chose them), then the fused blocks over it,
    checkpointing and the bound methods (:func:`fasttune.modes.finish_peft`). ``max_seq_length`` replaces the one
    given to ``from_pretrained``; ``kwargs`` go to peft's ``LoraConfig``."""
    state = model_state(model)
    max_rank = state.rl.max_lora_rank if state is not None else None
    if max_rank is not None and isinstance(settings.r, int) and settings.r > max_rank:
        raise ValueError(f"r: {settings.r} is above max_lora_rank={max_rank} given to from_pretrained; use "
                         f"r <= {max_rank} or load with a larger max_lora_rank")
    if settings.qat_scheme is not None:
        check_qat_model(model, settings.qat_scheme)  # before peft changes the model
    peft_model = inject_lora(model, settings, get_family(model.config.model_type), **kwargs)
    changes = {}
    if max_seq_length is not None:
        changes["max_seq_length"] = max_seq_length
    if settings.qat_scheme is not None:
        changes["qat_scheme"] = normalize_scheme(settings.qat_scheme)
    if changes:
        attach_state(peft_model, dataclasses.replace(state or FastState(None), **changes))
    if settings.qat_scheme is not None:  # before the fast forwards are re-installed: they fall back to its forward
        apply_qat(peft_model, settings.qat_scheme)
    return finish_peft(peft_model, settings.use_gradient_checkpointing)


__all__ = ["add_lora", "load_config", "load_pretrained", "quantization_config", "source_of"]
