"""Llama 3.2 Vision (mllama) language tower: Llama decoder layers with gated cross-attention layers between them.

The fast path patches the self-attention layers' norms, projections and MLPs (the Llama layout); the cross-attention
layers (``cross_attn``, with their own gates) keep transformers' forward. No GGUF map: llama.cpp has no mllama
architecture.
"""

from .spec import FamilySpec

SPEC = FamilySpec(
    family="mllama",
    model_type="mllama_text_model",
    wrapper_model_types=("mllama",),
    name="Llama-3.2-Vision",
)
