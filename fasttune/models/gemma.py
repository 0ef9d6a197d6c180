"""Gemma: RMSNorm x*(1+w), GeGLU (tanh), embeddings scaled by sqrt(hidden)."""

from .spec import FamilySpec

SPEC = FamilySpec(model_type="gemma", name="Gemma", norm="rms_offset", activation="gelu_tanh", embed_scale=True)
