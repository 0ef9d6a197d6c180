from .layers import (
    FastLinear4bit,
    FastLinear8bitLt,
    dequantize_weight,
    is_quantized_linear,
    patch_quantized_layers,
    restore_layers,
)

__all__ = [
    "FastLinear4bit",
    "FastLinear8bitLt",
    "dequantize_weight",
    "is_quantized_linear",
    "patch_quantized_layers",
    "restore_layers",
]
