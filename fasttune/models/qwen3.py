"""Qwen3: llama layout with per-head RMSNorm on q and k."""

from .spec import FamilySpec

SPEC = FamilySpec(model_type="qwen3", name="Qwen3", qk_norm=True, sliding_window=True)
