from .models import FAMILIES, MODEL_TYPES, build_tiny_model, tiny_config
from .tokenizer import FAMILY_TOKENS, build_tokenizer

__all__ = ["FAMILIES", "FAMILY_TOKENS", "MODEL_TYPES", "build_tiny_model", "build_tokenizer", "tiny_config"]
