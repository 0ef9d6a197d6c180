from .fp8 import FP8Linear
from .layers import (
    FastLinear4bit,
    FastLinear8bitLt,
    dequantize_weight,
    is_fake_quantized,
    is_quantized_linear,
    patch_quantized_layers,
    restore_layers,
)

__all__ = [
    "FP8Linear",
    "FastLinear4bit",
    "FastLinear8bitLt",
    "dequantize_weight",
    "is_fake_quantized",
    "is_quantized_linear",
    "patch_quantized_layers",
    "restore_layers",
]
