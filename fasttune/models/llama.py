"""Llama (1/2/3.x): RMSNorm x*w, SwiGLU, rotate-half RoPE."""

from .spec import FamilySpec

SPEC = FamilySpec(model_type="llama", name="Llama")
