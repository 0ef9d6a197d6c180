"""Mistral: llama layout, optional sliding-window attention."""

from .spec import FamilySpec

SPEC = FamilySpec(model_type="mistral", name="Mistral", sliding_window=True)
