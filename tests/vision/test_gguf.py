"""GGUF export of vision-language models, checked in llama.cpp: the language model's logits and the mmproj file's
image embeddings against transformers'."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from gguf import GGUFReader

from fasttune import FastVisionModel
from fasttune.export.gguf import mmproj as mmproj_module
from fasttune.export.llama_cpp import GGUFValidationError

pytest.importorskip("llama_cpp")
pytestmark = pytest.mark.llama_cpp


def _gemma3(tiny_vlm_dir):
    model, processor = FastVisionModel.from_pretrained(str(tiny_vlm_dir("gemma3")), load_in_4bit=False,
                                                       dtype=torch.float32)
    return FastVisionModel.get_peft_model(model, r=8, init_lora_weights=False), processor


def test_gemma3_language_model_and_mmproj_validate_in_llama_cpp(tiny_vlm_dir, tmp_path, caplog):
    model, processor = _gemma3(tiny_vlm_dir)
    with caplog.at_level("INFO", logger="fasttune"):
        paths = model.save_pretrained_gguf(str(tmp_path), processor, quantization_method=["f16", "q8_0"],
                                           validate=True)
    assert [p.name for p in paths] == ["model.F16.gguf", "model.Q8_0.gguf", "mmproj-model.F16.gguf"]
    assert "16 image tokens" in caplog.text and caplog.text.count("tokens match") == 2
    reader = GGUFReader(str(paths[-1]))
    fields = {f.name: f for f in reader.fields.values()}
    assert bytes(fields["clip.projector_type"].parts[-1]).decode() == "gemma3"
    names = {t.name for t in reader.tensors}
    assert {"v.patch_embd.weight", "v.blk.1.attn_out.weight", "v.post_ln.bias", "mm.input_projection.weight",
            "mm.soft_emb_norm.weight"} <= names and len(names) == 39
    assert not any(t.name.startswith("v.") for t in GGUFReader(str(paths[0])).tensors)
    assert (tmp_path / "Modelfile").exists()


def test_a_wrong_mmproj_fails_validation(tiny_vlm_dir, tmp_path, monkeypatch):
    """Without Gemma's 1 + w norm offset the projector is wrong: the image embeddings check must catch it."""
    model, processor = _gemma3(tiny_vlm_dir)
    wrong = dataclasses.replace(mmproj_module.MMPROJ_MAPS["gemma3"], offset_norms=())
    monkeypatch.setitem(mmproj_module.MMPROJ_MAPS, "gemma3", wrong)
    with pytest.raises(GGUFValidationError, match="image embeddings differ from transformers'"):
        model.save_pretrained_gguf(str(tmp_path), processor, quantization_method="f16", validate=True)


def test_unsupported_family_and_missing_processor_are_refused_before_writing(tiny_vlm_dir, tmp_path):
    model, processor = FastVisionModel.from_pretrained(str(tiny_vlm_dir("mllama")), load_in_4bit=False)
    with pytest.raises(ValueError, match="'mllama' has no mmproj export in fasttune yet"):
        model.save_pretrained_gguf(str(tmp_path / "a"), processor, quantization_method="f16")
    gemma, gemma_processor = _gemma3(tiny_vlm_dir)
    with pytest.raises(ValueError, match="pass the model's processor"):
        gemma.save_pretrained_gguf(str(tmp_path / "b"), gemma_processor.tokenizer, quantization_method="f16")
    assert not any((tmp_path / "a").glob("*.gguf")) and not any((tmp_path / "b").glob("*.gguf"))
