"""Export: merged safetensors, GGUF (every common type, pure Python), llama.cpp validation, Ollama, Hub.

The four Unsloth-style functions below are what the loader attaches to models as methods.
"""

from .gguf.save import push_to_hub_gguf, save_pretrained_gguf
from .hf import push_to_hub_merged, save_pretrained_merged
from .merge import NonFiniteWeightError, merged_state_dict
from .ollama import OllamaTemplateError, write_ollama_modelfile

__all__ = [
    "NonFiniteWeightError",
    "OllamaTemplateError",
    "merged_state_dict",
    "push_to_hub_gguf",
    "push_to_hub_merged",
    "save_pretrained_gguf",
    "save_pretrained_merged",
    "write_ollama_modelfile",
]
