"""GGUF export of vision-language models, checked in llama.cpp: the language model's logits and the mmproj file's
image embeddings against transformers'."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from gguf import GGUFReader

from fasttune import FastVisionModel
from fasttune.export.llama_cpp import GGUFValidationError
from fasttune.models import VISION_FAMILIES, Split

pytest.importorskip("llama_cpp")
pytestmark = pytest.mark.llama_cpp


def _adapted(tiny_vlm_dir, family="gemma3"):
    model, processor = FastVisionModel.from_pretrained(str(tiny_vlm_dir(family)), load_in_4bit=False,
                                                       dtype=torch.float32)
    return FastVisionModel.get_peft_model(model, r=8, init_lora_weights=False), processor


@pytest.mark.parametrize(("family", "projector", "arch", "some_names", "count", "image_tokens"), [
    ("gemma3", "gemma3", "gemma3", {"v.patch_embd.weight", "v.blk.1.attn_out.weight", "v.post_ln.bias",
                                    "mm.input_projection.weight", "mm.soft_emb_norm.weight"}, 39, 16),
    ("qwen2_vl", "qwen2vl_merger", "qwen2vl", {"v.patch_embd.weight", "v.patch_embd.weight.1", "v.blk.0.attn_q.bias",
                                               "v.blk.1.attn_v.weight", "v.post_ln.weight", "mm.0.weight",
                                               "mm.2.bias"}, 40, 16),
    # 224-pixel image: four 112-pixel attention windows in block 0, full attention in block 1
    ("qwen2_5_vl", "qwen2.5vl_merger", "qwen2vl", {"v.blk.0.ffn_gate.bias", "v.blk.1.ln2.weight", "v.post_ln.weight",
                                                   "v.patch_embd.weight.1", "mm.2.weight"}, 39, 64),
])
def test_language_model_and_mmproj_validate_in_llama_cpp(tiny_vlm_dir, tmp_path, caplog, family, projector, arch,
                                                         some_names, count, image_tokens):
    model, processor = _adapted(tiny_vlm_dir, family)
    with caplog.at_level("INFO", logger="fasttune"):
        paths = model.save_pretrained_gguf(str(tmp_path), processor, quantization_method=["f16", "q8_0"],
                                           validate=True)
    assert [p.name for p in paths] == ["model.F16.gguf", "model.Q8_0.gguf", "mmproj-model.F16.gguf"]
    assert f"{image_tokens} image tokens" in caplog.text and caplog.text.count("tokens match") == 2
    reader = GGUFReader(str(paths[-1]))
    fields = {f.name: f for f in reader.fields.values()}
    assert bytes(fields["clip.projector_type"].parts[-1]).decode() == projector
    names = {t.name for t in reader.tensors}
    assert some_names <= names and len(names) == count
    language = GGUFReader(str(paths[0]))
    assert bytes(language.fields["general.architecture"].parts[-1]).decode() == arch
    assert not any(t.name.startswith("v.") for t in language.tensors)
    assert (tmp_path / "Modelfile").exists()


def _with_mmproj(monkeypatch, model_type: str, **changes) -> None:
    """The registry's VLM family of ``model_type`` with its mmproj map changed, for this test only."""
    vision = VISION_FAMILIES[model_type]
    monkeypatch.setitem(VISION_FAMILIES, model_type,
                        dataclasses.replace(vision, mmproj=dataclasses.replace(vision.mmproj, **changes)))


def test_a_wrong_mmproj_fails_validation(tiny_vlm_dir, tmp_path, monkeypatch):
    """Without Gemma's 1 + w norm offset the projector is wrong: the image embeddings check must catch it."""
    model, processor = _adapted(tiny_vlm_dir)
    _with_mmproj(monkeypatch, "gemma3", offset_norms=())
    with pytest.raises(GGUFValidationError, match="image embeddings differ from transformers'"):
        model.save_pretrained_gguf(str(tmp_path), processor, quantization_method="f16", validate=True)


def test_swapped_query_and_key_fail_validation(tiny_vlm_dir, tmp_path, monkeypatch):
    """Qwen2-VL's fused qkv split in the wrong order gives other image embeddings: caught."""
    model, processor = _adapted(tiny_vlm_dir, "qwen2_vl")
    table = dict(VISION_FAMILIES["qwen2_vl"].mmproj.names)
    table["blocks.{}.attn.qkv.weight"] = Split(0, ("v.blk.{}.attn_k.weight", "v.blk.{}.attn_q.weight",
                                                   "v.blk.{}.attn_v.weight"))
    table["blocks.{}.attn.qkv.bias"] = Split(0, ("v.blk.{}.attn_k.bias", "v.blk.{}.attn_q.bias",
                                                 "v.blk.{}.attn_v.bias"))
    _with_mmproj(monkeypatch, "qwen2_vl", names=table)
    with pytest.raises(GGUFValidationError, match="image embeddings differ from transformers'"):
        model.save_pretrained_gguf(str(tmp_path), processor, quantization_method="f16", validate=True)


def test_unsupported_family_and_missing_processor_are_refused_before_writing(tiny_vlm_dir, tmp_path):
    model, processor = FastVisionModel.from_pretrained(str(tiny_vlm_dir("mllama")), load_in_4bit=False)
    with pytest.raises(ValueError, match="'mllama' has no mmproj export in fasttune yet"):
        model.save_pretrained_gguf(str(tmp_path / "a"), processor, quantization_method="f16")
    gemma, gemma_processor = _adapted(tiny_vlm_dir)
    with pytest.raises(ValueError, match="pass the model's processor"):
        gemma.save_pretrained_gguf(str(tmp_path / "b"), gemma_processor.tokenizer, quantization_method="f16")
    assert not any((tmp_path / "a").glob("*.gguf")) and not any((tmp_path / "b").glob("*.gguf"))
