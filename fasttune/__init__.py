"""fasttune: fast, memory-light fine-tuning with an Unsloth-compatible API.

Importing fasttune changes nothing in other libraries; every change is made on the model instances it returns.
"""

from .device import device_args, is_bfloat16_supported
from .loader import FastLanguageModel, FastModel
from .rl import PatchFastRL
from .vision import FastVisionModel

__version__ = "0.1.0"

__all__ = [
    "FastLanguageModel",
    "FastModel",
    "FastVisionModel",
    "PatchFastRL",
    "__version__",
    "device_args",
    "is_bfloat16_supported",
]
