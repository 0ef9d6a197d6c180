"""User-facing options as typed dataclasses that reject bad values, all mistakes reported at once."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any

from .device import resolve_dtype
from .quant.fp8 import fp8_problem

DEFAULT_TARGET_MODULES: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# use_gradient_checkpointing's values (fasttune.patch.checkpointing: what each does), in the order they are listed
# to users (the recipe's train.gradient_checkpointing too)
GRADIENT_CHECKPOINTING_MODES: tuple[Any, ...] = ("unsloth", True, False)
LORA_BIAS: tuple[str, ...] = ("none", "all", "lora_only")


class ConfigError(ValueError):
    """One or more invalid options; the message lists every problem, one per line."""


def _raise_if(problems: list[str], what: str) -> None:
    if problems:
        raise ConfigError(f"{what}: {len(problems)} invalid option(s):\n  - " + "\n  - ".join(problems))


def _is_finite_number(value: Any) -> bool:
    """A real, finite number (int, float or a numpy scalar); bools are not numbers here.

    Comparisons such as ``value <= 0`` are False for nan, so a range check alone lets nan through (and inf through
    an open upper bound): every numeric option goes through this first.
    """
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(float(value))


def _is_int(value: Any) -> bool:
    """An integer (int or numpy integer), not a bool and not a float such as 16.0."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


# The seeds torch.manual_seed accepts.
SEED_RANGE: tuple[int, int] = (-(2**63), 2**64 - 1)


def _help(text: str, default: Any = None, **kw: Any) -> Any:
    return field(default=default, metadata={"help": text}, **kw)


@dataclass
class LoadConfig:
    """Options of ``FastLanguageModel.from_pretrained`` (Unsloth's names and defaults)."""

    model_name: str = _help("local folder or Hub id of the model")
    max_seq_length: int = _help("longest sequence (tokens) to train or generate on", 2048)
    dtype: Any = _help("None (bf16 where fast, else fp16/fp32), a torch dtype or a name such as 'bfloat16'")
    load_in_4bit: bool = _help("NF4 4-bit base weights (bitsandbytes storage) for QLoRA", True)
    load_in_8bit: bool = _help("LLM.int8 8-bit base weights", False)
    load_in_16bit: bool = _help("base weights in dtype (bf16/fp16/fp32)", False)
    full_finetuning: bool = _help("train every weight instead of LoRA adapters (forces 16-bit loading)", False)
    trust_remote_code: bool = _help("run model code shipped with the checkpoint (only if you trust it)", False)
    load_in_fp8: Any = _help("float8 e4m3 base weights: True/'row' (a scale per output row) or 'block' (128x128)",
                             False)
    qat_scheme: str | None = _help("full fine-tuning with quantization-aware training: a fasttune.quant.qat scheme")

    def __post_init__(self) -> None:
        problems: list[str] = []
        fp8 = fp8_problem(self.load_in_fp8)
        if fp8 is not None:
            problems.append(fp8)
        if self.qat_scheme is not None:
            from .quant.qat import scheme_problem  # lazy: the QAT module imports the exporter, which imports config

            scheme = scheme_problem("qat_scheme", self.qat_scheme)
            if scheme is not None:
                problems.append(scheme)
            elif not self.full_finetuning:
                problems.append(f"qat_scheme={self.qat_scheme!r} in from_pretrained is for full fine-tuning "
                                "(full_finetuning=True); for LoRA pass it to get_peft_model(qat_scheme=...)")
        if self.load_in_fp8 not in (False, None) and self.load_in_8bit:
            problems.append(f"load_in_fp8={self.load_in_fp8!r} and load_in_8bit=True: choose one quantization")
        if not isinstance(self.model_name, str) or not self.model_name.strip():
            problems.append(f"model_name: {self.model_name!r} must be a non-empty string (a folder or a Hub id)")
        if not _is_int(self.max_seq_length) or self.max_seq_length <= 0:
            problems.append(f"max_seq_length: {self.max_seq_length!r} must be a positive integer")
        try:
            self.dtype = resolve_dtype(self.dtype)
        except ValueError as err:
            problems.append(str(err))
        if self.load_in_4bit and self.load_in_8bit:
            problems.append(
                "load_in_4bit=True and load_in_8bit=True: choose at most one quantization (4-bit, 8-bit, or neither)"
            )
        for name in ("load_in_4bit", "load_in_8bit", "load_in_16bit", "full_finetuning", "trust_remote_code"):
            if not isinstance(getattr(self, name), bool):
                problems.append(f"{name}: {getattr(self, name)!r} must be True or False")
        _raise_if(problems, "from_pretrained")

    @property
    def quantization(self) -> str | None:
        """'fp8', '4bit', '8bit' or None; full fine-tuning never quantizes. FP8 replaces the default 4-bit."""
        if self.full_finetuning or self.load_in_16bit:
            return None
        if self.load_in_fp8 not in (False, None):
            return "fp8"
        if self.load_in_4bit:
            return "4bit"
        return "8bit" if self.load_in_8bit else None


@dataclass
class LoraSettings:
    """Options of ``FastLanguageModel.get_peft_model`` (Unsloth's names and defaults)."""

    r: int = _help("LoRA rank", 16)
    lora_alpha: float = _help("LoRA scaling numerator (scale = alpha / r, or alpha / sqrt(r) with rsLoRA)", 16)
    lora_dropout: float = _help("dropout on the LoRA input, in [0, 1); 0 enables the fused path", 0.0)
    bias: str = _help("which biases to train: 'none', 'all' or 'lora_only'", "none")
    target_modules: Any = _help("linear layer names to adapt, 'all-linear', or a regex", DEFAULT_TARGET_MODULES)
    use_gradient_checkpointing: Any = _help("True, False or 'unsloth' (recompute, layer inputs offloaded)", "unsloth")
    random_state: int = _help("seed for the LoRA initialisation", 3407)
    use_rslora: bool = _help("rank-stabilised scaling alpha / sqrt(r)", False)
    use_dora: bool = _help("weight-decomposed LoRA (DoRA); uses peft's forward", False)
    modules_to_save: list[str] | None = _help("non-LoRA modules to train fully and save (e.g. lm_head, embed_tokens)")
    layers_to_transform: list[int] | int | None = _help("only adapt these layer indices")
    init_lora_weights: Any = _help("peft init: True (B=0), 'gaussian', 'pissa', 'olora', 'loftq', ...", True)
    qat_scheme: str | None = _help("quantization-aware training: train for the rounding of this scheme "
                                   "(Unsloth's int4, int8-int4, fp8-int4, fp8-fp8, or a GGUF type: q4_0, q4_k_m, ...)")

    def __post_init__(self) -> None:
        problems: list[str] = []
        if not _is_int(self.r) or self.r <= 0:
            problems.append(f"r: {self.r!r} must be a positive integer (typical: 8, 16, 32, 64)")
        if not _is_finite_number(self.lora_alpha) or self.lora_alpha <= 0:
            problems.append(f"lora_alpha: {self.lora_alpha!r} must be a positive number, finite (typical: r or 2*r)")
        if not _is_finite_number(self.lora_dropout) or not 0 <= self.lora_dropout < 1:
            problems.append(f"lora_dropout: {self.lora_dropout!r} must be in [0, 1) (a finite number)")
        if not _is_int(self.random_state) or not SEED_RANGE[0] <= self.random_state <= SEED_RANGE[1]:
            problems.append(f"random_state: {self.random_state!r} must be an integer seed (torch accepts "
                            f"{SEED_RANGE[0]} to {SEED_RANGE[1]})")
        for name in ("use_rslora", "use_dora"):
            if not isinstance(getattr(self, name), bool):
                problems.append(f"{name}: {getattr(self, name)!r} must be True or False")
        if self.bias not in LORA_BIAS:
            problems.append(f"bias: {self.bias!r} is not allowed; choose one of {list(LORA_BIAS)}")
        if self.use_gradient_checkpointing not in GRADIENT_CHECKPOINTING_MODES:
            problems.append(
                f"use_gradient_checkpointing: {self.use_gradient_checkpointing!r} is not allowed; "
                f"choose one of {list(GRADIENT_CHECKPOINTING_MODES)}"
            )
        if not isinstance(self.target_modules, (str, list, tuple)) or (
            not isinstance(self.target_modules, str) and not all(isinstance(t, str) for t in self.target_modules)
        ):
            problems.append(f"target_modules: {self.target_modules!r} must be a list of names, 'all-linear' or a regex")
        elif not self.target_modules:
            problems.append("target_modules: empty; name at least one linear layer")
        layers = [self.layers_to_transform] if _is_int(self.layers_to_transform) else self.layers_to_transform
        if layers is not None and (
            not isinstance(layers, (list, tuple)) or not all(_is_int(i) and i >= 0 for i in layers)
        ):
            problems.append(f"layers_to_transform: {self.layers_to_transform!r} must be non-negative layer indices")
        if self.qat_scheme is not None:
            from .quant.qat import scheme_problem  # lazy: the QAT module imports the exporter, which imports config

            scheme = scheme_problem("qat_scheme", self.qat_scheme)
            if scheme is not None:
                problems.append(scheme)
            if self.lora_dropout not in (0, 0.0) and _is_finite_number(self.lora_dropout):
                problems.append(f"qat_scheme={self.qat_scheme!r} with lora_dropout={self.lora_dropout!r}: QAT "
                                "fake-quantizes the merged weight W + s*B@A, which has no place for dropout; use 0")
            if self.use_dora is True:
                problems.append(f"qat_scheme={self.qat_scheme!r} with use_dora=True: QAT supports plain LoRA")
        _raise_if(problems, "get_peft_model")


@dataclass
class RLOptions:
    """``from_pretrained``'s rollout options (Unsloth passes them to vLLM). ``fast_inference=True`` on a CUDA
    machine with vLLM installed makes ``fasttune.trl.GRPOTrainer`` sample through TRL's vLLM integration (colocate
    mode, ``gpu_memory_utilization`` as vLLM's share); elsewhere fasttune's own engine samples on the model itself
    (``model.fast_generate`` always uses it). ``max_lora_rank`` bounds the adapters ``get_peft_model`` /
    ``load_lora`` accept."""

    fast_inference: bool = _help("sample rollouts with model.fast_generate (fasttune's KV-cache engine)", False)
    max_lora_rank: int | None = _help("largest LoRA rank get_peft_model and load_lora accept (None: any)")
    gpu_memory_utilization: float | None = _help("vLLM's GPU memory share in (0, 1] (vLLM rollouts only)")

    def __post_init__(self) -> None:
        problems: list[str] = []
        if not isinstance(self.fast_inference, bool):
            problems.append(f"fast_inference: {self.fast_inference!r} must be True or False")
        if self.max_lora_rank is not None and (not _is_int(self.max_lora_rank) or self.max_lora_rank <= 0):
            problems.append(f"max_lora_rank: {self.max_lora_rank!r} must be a positive integer or None")
        if self.gpu_memory_utilization is not None and (
                not _is_finite_number(self.gpu_memory_utilization) or not 0 < self.gpu_memory_utilization <= 1):
            problems.append(f"gpu_memory_utilization: {self.gpu_memory_utilization!r} must be in (0, 1] or None")
        _raise_if(problems, "from_pretrained")


__all__ = ["ConfigError", "DEFAULT_TARGET_MODULES", "LoadConfig", "LoraSettings", "RLOptions"]
