"""The one list of model families. Everything else (fast path, GGUF export, tiny models) asks this module.

``_MODULES`` is in the order families are listed to users and parametrized in tests.
"""

from __future__ import annotations

from . import gemma, gemma2, gemma3, llama, mistral, mllama, phi3, qwen2, qwen2_vl, qwen3
from .spec import FamilySpec

_MODULES = (llama, mistral, qwen2, qwen3, gemma, gemma2, gemma3, phi3)

# vision-language towers (no tiny text model, no GGUF map): their text model types get the fast path
_VLM_SPECS = (qwen2_vl.SPEC, qwen2_vl.SPEC_2_5, mllama.SPEC)

_SPECS: tuple[FamilySpec, ...] = (*(m.SPEC for m in _MODULES), *_VLM_SPECS)


def _by_model_type(specs: tuple[FamilySpec, ...]) -> dict[str, FamilySpec]:
    """``model_type -> spec`` for every model type a family covers; two families claiming one type is a bug."""
    table: dict[str, FamilySpec] = {}
    for spec in specs:
        for model_type in spec.model_types:
            if model_type in table:
                raise RuntimeError(f"fasttune.models: model_type {model_type!r} is claimed by both "
                                   f"{table[model_type].family!r} and {spec.family!r}")
            table[model_type] = spec
    return table


# model_type -> spec, text models and the multimodal wrappers around them (gemma3 -> the gemma3_text family).
FAMILIES: dict[str, FamilySpec] = _by_model_type(_SPECS)


def families() -> tuple[FamilySpec, ...]:
    """Every registered family, in registry order."""
    return _SPECS


def get_family(model_type: str) -> FamilySpec | None:
    """The spec registered for ``model_type``, or None when fasttune has no fast path for it."""
    return FAMILIES.get(model_type)


def family(name: str) -> FamilySpec:
    """The spec of the family called ``name`` (``"gemma3"``, the family file's name); an error lists the known ones."""
    for spec in _SPECS:
        if spec.family == name:
            return spec
    raise ValueError(f"family: {name!r} is not a fasttune model family; choose one of {[s.family for s in _SPECS]}")
