"""Loading a folder checks what a killed save or an interrupted copy can leave behind, naming the file.

safetensors' own error for a truncated file ("incomplete metadata, file not fully covered") names no file, and
transformers re-raises it without one; fasttune checks every header first. A folder that a killed fasttune save left
half installed is repaired before it is read.
"""

from __future__ import annotations

import shutil

import pytest

from fasttune import FastLanguageModel
from fasttune.source import resolve_source


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_truncated_safetensors_error_names_the_file(tiny_model_dir, tmp_path):
    folder = _copy(tiny_model_dir("llama"), tmp_path / "model")
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"model\.safetensors.* is not a readable safetensors file .*truncated"):
        FastLanguageModel.from_pretrained(str(folder), load_in_4bit=False, dtype="float32")


def test_corrupt_header_error_names_the_file(tiny_model_dir, tmp_path):
    folder = _copy(tiny_model_dir("llama"), tmp_path / "model")
    (folder / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(ValueError, match=r"model\.safetensors"):
        resolve_source(str(folder))


def test_intact_folder_resolves(tiny_model_dir, tmp_path):
    folder = _copy(tiny_model_dir("llama"), tmp_path / "model")
    assert resolve_source(str(folder)).base == str(folder)
