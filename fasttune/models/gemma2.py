"""Gemma 2: Gemma plus sandwich norms, logit softcapping and alternating sliding-window layers."""

from .spec import FamilySpec

SPEC = FamilySpec(
    model_type="gemma2",
    name="Gemma2",
    norm="rms_offset",
    activation="gelu_tanh",
    embed_scale=True,
    softcapping=True,
    sliding_window=True,
    sandwich_norms=True,
)
