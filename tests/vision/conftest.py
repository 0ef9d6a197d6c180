"""Tiny vision-language model folders, built once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from fasttune.tiny.vision import build_tiny_vlm


@pytest.fixture(scope="session")
def tiny_vlm_dir(tmp_path_factory):
    """``tiny_vlm_dir(family) -> Path``: a saved tiny VLM + processor folder, built once per session."""
    cache: dict[str, Path] = {}

    def make(family: str = "qwen2_vl") -> Path:
        if family not in cache:
            cache[family] = build_tiny_vlm(family, tmp_path_factory.mktemp(f"vlm-{family}"))
        return cache[family]

    return make
