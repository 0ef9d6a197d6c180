"""Gemma 3 (text): Gemma 2 layout with q/k norms instead of attention softcapping, 5:1 local/global layers."""

from .spec import FamilySpec

SPEC = FamilySpec(
    model_type="gemma3_text",
    name="Gemma3",
    norm="rms_offset",
    activation="gelu_tanh",
    embed_scale=True,
    qk_norm=True,
    sliding_window=True,
    sandwich_norms=True,
)
