"""Qwen2 / Qwen2.5: llama layout with q/k/v biases, optional sliding window."""

from .spec import FamilySpec

SPEC = FamilySpec(model_type="qwen2", name="Qwen2", sliding_window=True)
