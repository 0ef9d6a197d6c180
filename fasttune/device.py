"""Device facts: which dtype computes fast here, and the trainer arguments that work on this device."""

from __future__ import annotations

import functools
import os
from typing import Any

import torch

_DTYPE_NAMES: dict[str, torch.dtype] = {
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
}


@functools.cache
def _cpu_has_fast_bf16() -> bool:
    """True when the CPU has native bf16 matmul (AVX512-BF16 or AMX-BF16), as oneDNN reports it."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch build without mkldnn ops
        return False


def is_bfloat16_supported() -> bool:
    """Whether bf16 is the fast dtype on this machine's training device (CUDA if present, else CPU)."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return _cpu_has_fast_bf16()


def default_dtype() -> torch.dtype:
    """bf16 where the device does bf16 well; else fp16 on CUDA and fp32 on CPU."""
    if is_bfloat16_supported():
        return torch.bfloat16
    return torch.float16 if torch.cuda.is_available() else torch.float32


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    """Turn the user's ``dtype`` (None, a torch dtype, or a name such as "bfloat16"/"fp16") into a torch dtype."""
    if dtype is None or dtype == "auto":
        return default_dtype()
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.bfloat16, torch.float16, torch.float32):
            raise ValueError(f"dtype: {dtype} is not supported; use torch.bfloat16, torch.float16, torch.float32 or None")
        return dtype
    if isinstance(dtype, str) and dtype.lower().removeprefix("torch.") in _DTYPE_NAMES:
        return _DTYPE_NAMES[dtype.lower().removeprefix("torch.")]
    raise ValueError(
        f"dtype: {dtype!r} is not a known dtype; use None (auto), a torch dtype, or one of {sorted(_DTYPE_NAMES)}"
    )


def default_device_map() -> dict[str, str] | str:
    """Where ``from_pretrained`` puts the model by default: all on CPU without CUDA; under a distributed launcher
    (torchrun / accelerate set ``LOCAL_RANK``) all on this process's own GPU, since DDP and FSDP2 want one whole copy
    or shard per rank; otherwise spread over the visible GPUs in order."""
    if not torch.cuda.is_available():
        return {"": "cpu"}
    local_rank = os.environ.get("LOCAL_RANK")
    if local_rank is not None:
        return {"": f"cuda:{int(local_rank)}"}
    return "sequential"


def device_args() -> dict[str, Any]:
    """TrainingArguments/SFTConfig fields that work on this machine, CPU or CUDA.

    TRL's configs default to ``bf16=True``; transformers then refuses to start on a machine without a bf16 GPU unless
    ``use_cpu=True`` is also set. ``SFTConfig(**device_args(), ...)`` picks bf16/fp16 and ``use_cpu`` correctly.
    """
    cuda = torch.cuda.is_available()
    bf16 = is_bfloat16_supported()
    return {"bf16": bf16, "fp16": cuda and not bf16, "use_cpu": not cuda}
