"""model_type -> FamilySpec table."""

from __future__ import annotations

from . import gemma, gemma2, gemma3, llama, mistral, phi3, qwen2, qwen3
from .spec import FamilySpec

FAMILIES: dict[str, FamilySpec] = {
    m.SPEC.model_type: m.SPEC for m in (llama, mistral, qwen2, qwen3, gemma, gemma2, gemma3, phi3)
}
# Multimodal wrappers whose text tower is a known family.
FAMILIES["gemma3"] = gemma3.SPEC


def get_family(model_type: str) -> FamilySpec | None:
    """The spec registered for ``model_type``, or None when fasttune has no fast path for it."""
    return FAMILIES.get(model_type)

