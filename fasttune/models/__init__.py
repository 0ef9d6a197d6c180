"""Model families: one file per family holds every fact fasttune needs about it, as plain data.

``fasttune/models/<family>.py`` declares ``SPEC = FamilySpec(...)`` with:

- the ``model_type`` of its text causal LM, and any multimodal wrappers' (``wrapper_model_types``);
- the fast path's facts: norm kind, activation, attention / MLP projection names, fused LoRA aliases, and whether
  :mod:`fasttune.patch` patches it (``fast_path``);
- ``gguf``: its :class:`~fasttune.models.gguf.TensorMap` (transformers -> GGUF tensor names, q/k permutation, norm
  offset) and the hyper-parameter facts llama.cpp's architecture needs (softcapping, sliding window kind, ...);
- ``tiny``: its tiny random model's config overrides and tokenizer special tokens (:class:`TinySpec`).

:mod:`fasttune.models.registry` is the only list of families; patch/, export/gguf and fasttune.tiny ask it
(``get_family(model_type)``, ``families()``, ``family(name)``). This package imports only the standard library, and
never fasttune.export / fasttune.patch / fasttune.tiny (they depend on it, not the other way round).

Adding a family
---------------
1. Write ``fasttune/models/<family>.py`` with ``SPEC = FamilySpec(family="<family>", model_type=..., ...)``: copy
   the closest family, compose its GGUF names from the blocks in :mod:`fasttune.models.gguf`, and set the
   ``TensorMap`` flags for what llama.cpp's architecture reads (check convert_hf_to_gguf.py's model class).
2. Add the module to ``_MODULES`` in :mod:`fasttune.models.registry`.
3. Tests: the tiny-family parametrized tests (tests/foundation, tests/fast, tests/export) pick the family up from
   ``fasttune.tiny.FAMILIES``; add assertions for anything family-specific it writes or patches.
"""

from .gguf import TensorMap
from .registry import FAMILIES, families, family, get_family
from .spec import FamilySpec, SpecialTokens, TinySpec

__all__ = ["FAMILIES", "FamilySpec", "SpecialTokens", "TensorMap", "TinySpec", "families", "family", "get_family"]
