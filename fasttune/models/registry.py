"""The one list of model families. Everything else (fast path, GGUF export, vision collator, tiny models) asks this
module.

``_MODULES`` is in the order families are listed to users and parametrized in tests. A module declares ``SPEC`` (a
text family, or a VLM's language tower) and/or ``VISION`` (a vision-language family); a text family is one line
here, and so is a VLM family.
"""

from __future__ import annotations

from . import (
    gemma,
    gemma2,
    gemma3,
    gpt_oss,
    llama,
    llava,
    mistral,
    mixtral,
    mllama,
    phi3,
    qwen2,
    qwen2_5_vl,
    qwen2_vl,
    qwen3,
    qwen3_moe,
)
from .spec import FamilySpec, VisionSpec

_MODULES = (llama, mistral, qwen2, qwen3, gemma, gemma2, gemma3, phi3, qwen3_moe, mixtral, gpt_oss, qwen2_vl, qwen2_5_vl,
            mllama, llava)

_SPECS: tuple[FamilySpec, ...] = tuple(m.SPEC for m in _MODULES if hasattr(m, "SPEC"))
_VISION: tuple[VisionSpec, ...] = tuple(m.VISION for m in _MODULES if hasattr(m, "VISION"))


def _by_model_type(specs: tuple[FamilySpec, ...], vision: tuple[VisionSpec, ...] = ()) -> dict[str, FamilySpec]:
    """``model_type -> spec`` for every text model type and every VLM's (its language tower's family); two families
    claiming one type is a bug."""
    table: dict[str, FamilySpec] = {}
    claims = [(s.model_type, s, s.family) for s in specs] + [(v.model_type, v.language, v.family) for v in vision]
    owners: dict[str, str] = {}
    for model_type, spec, owner in claims:
        if model_type in table:
            raise RuntimeError(f"fasttune.models: model_type {model_type!r} is claimed by both "
                               f"{owners[model_type]!r} and {owner!r}")
        table[model_type], owners[model_type] = spec, owner
    return table


# model_type -> spec, text models and the multimodal models around them (gemma3 -> the gemma3_text family).
FAMILIES: dict[str, FamilySpec] = _by_model_type(_SPECS, _VISION)
# model_type of a multimodal model -> its vision-language family.
VISION_FAMILIES: dict[str, VisionSpec] = {v.model_type: v for v in _VISION}


def families() -> tuple[FamilySpec, ...]:
    """Every registered text family (and VLM language tower), in registry order."""
    return _SPECS


def vision_families() -> tuple[VisionSpec, ...]:
    """Every registered vision-language family, in registry order."""
    return _VISION


def get_family(model_type: str) -> FamilySpec | None:
    """The spec registered for ``model_type``, or None when fasttune has no fast path for it."""
    return FAMILIES.get(model_type)


def get_vision_family(model_type: str) -> VisionSpec | None:
    """The vision-language family of a multimodal ``model_type``, or None when fasttune does not know it."""
    return VISION_FAMILIES.get(model_type)


def family(name: str) -> FamilySpec:
    """The spec of the family called ``name`` (``"gemma3"``, the family file's name); an error lists the known ones."""
    for spec in _SPECS:
        if spec.family == name:
            return spec
    raise ValueError(f"family: {name!r} is not a fasttune model family; choose one of {[s.family for s in _SPECS]}")


def vision_family(name: str) -> VisionSpec:
    """The vision-language family called ``name``; an error lists the known ones."""
    for spec in _VISION:
        if spec.family == name:
            return spec
    raise ValueError(f"family: {name!r} is not a fasttune vision-language family; choose one of "
                     f"{[s.family for s in _VISION]}")
