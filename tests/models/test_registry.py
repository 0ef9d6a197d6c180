"""The family registry is the one list of families: the fast path, GGUF export and tiny models all derive from it."""

from __future__ import annotations

import ast
import dataclasses
import sys
from pathlib import Path

import pytest

import fasttune.models as models_pkg
from fasttune.export.gguf.mmproj import mmproj_map
from fasttune.export.gguf.tensor_maps import TENSOR_MAPS
from fasttune.models import (
    FAMILIES,
    VISION_FAMILIES,
    families,
    family,
    get_family,
    get_vision_family,
    vision_families,
    vision_family,
)
from fasttune.models.registry import _by_model_type
from fasttune.patch import FAST_PATHS
from fasttune.tiny import FAMILIES as TINY_FAMILIES
from fasttune.tiny import FAMILY_TOKENS, MODEL_TYPES
from fasttune.tiny.vision import FAMILIES as TINY_VLM_FAMILIES


def test_every_model_type_of_a_family_finds_it():
    for spec in families():
        assert family(spec.family) is spec
        assert get_family(spec.model_type) is spec, spec.family
    for vision in vision_families():  # a multimodal model_type finds its language tower's family
        assert vision_family(vision.family) is vision is get_vision_family(vision.model_type)
        assert get_family(vision.model_type) is vision.language, vision.family
    assert get_family("gemma3") is get_family("gemma3_text") is family("gemma3")
    assert get_family("llava") is family("llama")
    assert get_family("gpt2") is None and get_vision_family("gpt2") is None
    with pytest.raises(ValueError, match="'gpt9' is not a fasttune model family; choose one of"):
        family("gpt9")
    with pytest.raises(ValueError, match="'gpt9' is not a fasttune vision-language family; choose one of"):
        vision_family("gpt9")


def test_two_families_claiming_one_model_type_is_an_error():
    clash = dataclasses.replace(family("llama"), family="llama_copy")
    with pytest.raises(RuntimeError, match="'llama' is claimed by both 'llama' and 'llama_copy'"):
        _by_model_type((family("llama"), clash))
    wrapper = dataclasses.replace(vision_family("llava"), family="llava_copy", model_type="gemma3_text")
    with pytest.raises(RuntimeError, match="'gemma3_text' is claimed by both 'gemma3' and 'llava_copy'"):
        _by_model_type(families(), (wrapper,))


def test_other_tables_are_derived_from_the_registry():
    specs, vlms = families(), vision_families()
    assert set(FAMILIES) == {s.model_type for s in specs} | {v.model_type for v in vlms}
    assert VISION_FAMILIES == {v.model_type: v for v in vlms}
    assert TINY_VLM_FAMILIES == tuple(v.family for v in vlms if v.tiny is not None)
    for vision in vlms:
        config = type("Config", (), {"model_type": vision.model_type})()
        if vision.mmproj is None:
            with pytest.raises(ValueError, match="has no mmproj export"):
                mmproj_map(config)
        else:
            assert mmproj_map(config) is vision.mmproj
    assert set(FAST_PATHS) == {s.model_type for s in specs if s.fast_path}
    assert TENSOR_MAPS == {s.model_type: s.gguf for s in specs if s.gguf is not None}
    assert TINY_FAMILIES == tuple(s.family for s in specs if s.tiny is not None)
    assert MODEL_TYPES == {s.family: s.model_type for s in specs if s.tiny is not None}
    assert FAMILY_TOKENS == {s.family: s.tiny.tokens for s in specs if s.tiny is not None}


def test_models_package_is_plain_data():
    """fasttune.models imports only the standard library and itself, never export/patch/tiny (they depend on it)."""
    allowed = set(sys.stdlib_module_names)
    for path in sorted(Path(models_pkg.__file__).parent.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                roots = [node.module.split(".")[0]]
            elif isinstance(node, ast.Import):
                roots = [alias.name.split(".")[0] for alias in node.names]
            else:
                continue
            assert all(root in allowed for root in roots), f"{path.name} imports {roots}"
