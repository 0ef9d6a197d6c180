"""Model families: one file per family holds every fact fasttune needs about it, as plain data.

``fasttune/models/<family>.py`` declares ``SPEC = FamilySpec(...)`` with:

- the ``model_type`` of its text causal LM;
- the fast path's facts: norm kind, activation, attention / MLP projection names, fused LoRA aliases, and whether
  :mod:`fasttune.patch` patches it (``fast_path``);
- ``gguf``: its :class:`~fasttune.models.gguf.TensorMap` (transformers -> GGUF tensor names, q/k permutation, norm
  offset) and the hyper-parameter facts llama.cpp's architecture needs (softcapping, sliding window kind, ...);
- ``tiny``: its tiny random model's config overrides and tokenizer special tokens (:class:`TinySpec`).

A vision-language family's file declares ``VISION = VisionSpec(...)`` too (or only, when its language tower is
another family's, as LLaVA's is Llama): the multimodal ``model_type``, its language tower's ``FamilySpec``, how the
vision collator packs its rows, its mmproj map (:class:`~fasttune.models.mmproj.MMProjMap`) and its tiny VLM
(:class:`TinyVisionSpec`).

:mod:`fasttune.models.registry` is the only list of families; patch/, export/gguf, vision/ and fasttune.tiny ask it
(``get_family(model_type)``, ``families()``, ``family(name)``, ``get_vision_family(model_type)``,
``vision_families()``). This package imports only the standard library, and never fasttune.export / fasttune.patch /
fasttune.tiny (they depend on it, not the other way round); ``tests/foundation/test_layout.py`` fails when a family's
name or table appears anywhere else in the package.

Adding a family
---------------
1. Write ``fasttune/models/<family>.py`` with ``SPEC = FamilySpec(family="<family>", model_type=..., ...)``: copy
   the closest family, compose its GGUF names from the blocks in :mod:`fasttune.models.gguf`, and set the
   ``TensorMap`` flags for what llama.cpp's architecture reads (check convert_hf_to_gguf.py's model class).
   A VLM adds ``VISION = VisionSpec(...)``: ``packing``, the mmproj names composed from
   :mod:`fasttune.models.mmproj`'s blocks and flags (check llama.cpp's ``tools/mtmd/clip.cpp``), and the tiny VLM's
   configs, markers and processor classes as data.
2. Add the module to ``_MODULES`` in :mod:`fasttune.models.registry`.
3. Tests: the tiny-family parametrized tests (tests/foundation, tests/patch, tests/export, tests/vision) pick the
   family up from ``fasttune.tiny.FAMILIES`` / ``fasttune.tiny.vision.FAMILIES``; add assertions for anything
   family-specific it writes or patches.
"""

from .gguf import Split, TensorMap
from .mmproj import MMProjMap
from .registry import (
    FAMILIES,
    VISION_FAMILIES,
    families,
    family,
    get_family,
    get_vision_family,
    vision_families,
    vision_family,
)
from .spec import FamilySpec, MoESpec, SpecialTokens, TinySpec, TinyVisionSpec, VisionSpec

__all__ = ["FAMILIES", "VISION_FAMILIES", "FamilySpec", "MMProjMap", "MoESpec", "SpecialTokens", "Split", "TensorMap",
           "TinySpec",
           "TinyVisionSpec", "VisionSpec", "families", "family", "get_family", "get_vision_family", "vision_families",
           "vision_family"]
