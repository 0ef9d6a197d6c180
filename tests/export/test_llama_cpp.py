"""GGUF files loaded by llama.cpp itself (llama-cpp-python): same tokens, same logits as the HF model."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from export_helpers import lora_model

from fasttune.data.chat import get_chat_template
from fasttune.export import save_pretrained_gguf
from fasttune.export.gguf import tensor_maps
from fasttune.export.gguf.reader import reference_model
from fasttune.export.gguf.writer import write_gguf
from fasttune.export.llama_cpp import GGUFValidationError, validate_gguf
from fasttune.export.merge import merged_state_dict
from fasttune.tiny import FAMILIES

pytest.importorskip("llama_cpp")
pytestmark = pytest.mark.llama_cpp

TEMPLATES = {"llama": "llama-3.1", "mistral": "mistral", "qwen2": "qwen-2.5", "qwen3": "qwen-3", "gemma": "gemma",
             "gemma2": "gemma", "gemma3": "gemma", "phi3": "phi-3", "qwen3_moe": "qwen-3", "mixtral": "mistral",
             "gpt_oss": "gpt-oss"}


@pytest.mark.parametrize("family", FAMILIES)
def test_f16_matches_hf_fp32(family, merged, tiny_tokenizer, tmp_path):
    model, state = merged(family)
    tokenizer = get_chat_template(tiny_tokenizer(family), TEMPLATES[family])
    path = tmp_path / "m.gguf"
    write_gguf(path, state, model.config, tokenizer, "f16")
    report = validate_gguf(path, model, tokenizer, max_kl=1e-5, max_abs=5e-3)
    assert report.tokens_match and report.n_tokens > 10
    assert report.max_abs_diff < 5e-3 and report.top1 == 1.0, report


def test_expert_lora_merged_gguf_runs_in_llama_cpp(tiny_model_dir, tiny_tokenizer, tmp_path):
    """LoRA on every expert (peft's target_parameters), merged by fasttune and written in llama.cpp's qwen3moe layout.

    Mean KL and the top-1 tokens are the criteria here, not the largest logit difference: with the experts moved by
    the adapters, llama.cpp's f32 arithmetic and torch's pick different experts at a near tie for one position of
    this prompt (max |diff| 0.053 in an f32 file as in an f16 one, mean KL 6.5e-6); a misplaced expert delta gives a
    KL of 1e-4 and more (the plain-expert cases above)."""
    model = lora_model(tiny_model_dir("qwen3_moe"), "qwen3_moe", experts=True)
    assert any("experts" in n and "lora_A" in n for n, _ in model.named_parameters())
    state = merged_state_dict(model, dtype=torch.float32)
    tokenizer = get_chat_template(tiny_tokenizer("qwen3_moe"), TEMPLATES["qwen3_moe"])
    path = tmp_path / "experts.gguf"
    write_gguf(path, state, model.config, tokenizer, "f32")
    report = validate_gguf(path, model, tokenizer, max_kl=1e-5, max_abs=1.0)
    assert report.tokens_match and report.kl < 1e-5 and report.top1 == 1.0, report


@pytest.mark.parametrize(
    "family,ftype",
    [("llama", t) for t in ("q8_0", "q4_0", "q5_1", "q4_k_m", "q2_k", "q3_k_l", "q5_k_s", "q6_k")]
    + [("gemma2", "q8_0"), ("gemma2", "q4_k_m"), ("qwen2", "q4_k_m"), ("phi3", "q5_k_m")],
)
def test_quantized_matches_its_dequantized_weights(family, ftype, merged, tiny_tokenizer, tmp_path):
    model, state = merged(family)
    tokenizer = tiny_tokenizer(family)
    path = tmp_path / f"{ftype}.gguf"
    write_gguf(path, state, model.config, tokenizer, ftype)
    report = validate_gguf(path, reference_model(path, model.config), tokenizer, max_kl=1e-4)
    assert report.tokens_match and report.kl < 1e-4 and report.top1 >= 0.9, report


# Quantized MoE files against the model holding their own dequantized weights: what is left is llama.cpp's arithmetic
# (activations in 8-bit blocks), which flips some top-k expert choices of a tiny random router. Measured 2026-12-07,
# mean KL over three prompts, fasttune's file / llama.cpp's own quantizer run on the same f16 file:
#   gpt-oss q8_0 6.7e-6..6.3e-5 / 7.4e-6..4.5e-5, q4_k_m 2.7e-5..1.6e-4 / 9.6e-6..1.3e-4, mxfp4_moe 7e-5..1.6e-4;
#   qwen3_moe and mixtral q8_0 / q4_k_m 5e-6..2.3e-5 (both quantizers). A wrong expert layout gives 1e-4..2e-2 on f16
#   files, whose bound stays 1e-5 (test_f16_matches_hf_fp32).
MOE_MAX_KL = 5e-4


@pytest.mark.parametrize("family,ftype", [("qwen3_moe", "q4_k_m"), ("mixtral", "q4_k_m"), ("gpt_oss", "q8_0"),
                                          ("gpt_oss", "mxfp4_moe")])
def test_moe_types_are_llama_cpps_and_the_file_runs(family, ftype, merged, tiny_tokenizer, tmp_path):
    """Every tensor's type is the one llama.cpp's quantizer picks from the f16 file (expert rules, n_expert == 8 rules,
    the fallback of the 176-wide ffn_down_exps rows), MXFP4 blocks are llama.cpp's bytes, and the file computes its
    own weights' logits in llama.cpp."""
    from gguf import GGUFReader
    from test_mixes import _llama_cpp_quantize

    model, state = merged(family)
    tokenizer = tiny_tokenizer(family)
    write_gguf(tmp_path / "f16.gguf", state, model.config, tokenizer, "f16")
    path = tmp_path / f"{ftype}.gguf"
    report = write_gguf(path, state, model.config, tokenizer, ftype)
    theirs = _llama_cpp_quantize(tmp_path / "f16.gguf", tmp_path / "theirs.gguf", ftype)
    assert report.tensor_types == {name: qtype.name for name, (qtype, _) in theirs.items()}
    assert report.tensor_types["blk.0.ffn_down_exps.weight"] == "F16"  # 176 columns: no block type holds them
    if ftype == "mxfp4_moe":
        ours = {t.name: np.array(t.data) for t in GGUFReader(path).tensors}
        for name in ("blk.0.ffn_gate_exps.weight", "blk.3.ffn_up_exps.weight"):
            assert report.tensor_types[name] == "MXFP4"
            assert np.mean(ours[name] == theirs[name][1]) >= 0.99, name  # measured 0.998 (ties rounded otherwise)
    result = validate_gguf(path, reference_model(path, model.config), tokenizer, max_kl=MOE_MAX_KL)
    assert result.tokens_match and result.top1 >= 0.8, result


def test_a_wrong_expert_layout_fails_validation(merged, tiny_tokenizer, tmp_path, monkeypatch):
    """gpt-oss's gate/up cut into halves instead of de-interleaved loads and runs, but computes something else."""
    model, state = merged("gpt_oss")
    tmap = tensor_maps.TENSOR_MAPS["gpt_oss"]
    key = "model.layers.{}.mlp.experts.gate_up_proj"
    broken = dataclasses.replace(tmap, names={**tmap.names, key: dataclasses.replace(tmap.names[key], interleaved=False)})
    monkeypatch.setitem(tensor_maps.TENSOR_MAPS, "gpt_oss", broken)
    write_gguf(tmp_path / "bad.gguf", state, model.config, tiny_tokenizer("gpt_oss"), "f16")
    with pytest.raises(GGUFValidationError, match="KL"):
        validate_gguf(tmp_path / "bad.gguf", model, tiny_tokenizer("gpt_oss"), max_kl=1e-5)


def test_gpt_oss_save_validate_and_harmony_modelfile(tiny_model_dir, tiny_tokenizer, tmp_path):
    model = lora_model(tiny_model_dir("gpt_oss"), "gpt_oss")
    tokenizer = get_chat_template(tiny_tokenizer("gpt_oss"), "gpt-oss")
    paths = save_pretrained_gguf(model, tmp_path, tokenizer, ["mxfp4", "f16"], validate=True)
    assert [p.name for p in paths] == ["model.MXFP4_MOE.gguf", "model.F16.gguf"]
    modelfile = (tmp_path / "Modelfile").read_text()
    assert modelfile.startswith("FROM ./model.MXFP4_MOE.gguf")
    assert "<|start|>assistant<|channel|>final<|message|>{{ $m.Content }}<|return|>" in modelfile
    for stop in ("<|return|>", "<|call|>"):
        assert f'PARAMETER stop "{stop}"' in modelfile


def test_validate_flag_and_a_wrong_file_fails(tiny_model_dir, tiny_tokenizer, tmp_path, monkeypatch):
    model = lora_model(tiny_model_dir("llama"), "llama")
    tokenizer = tiny_tokenizer("llama")
    paths = save_pretrained_gguf(model, tmp_path / "ok", tokenizer, ["q8_0", "f16"], validate=True)
    assert [p.name for p in paths] == ["model.Q8_0.gguf", "model.F16.gguf"]
    # Without llama's q/k permutation the file loads but computes something else: validation must say so.
    broken = dataclasses.replace(tensor_maps.TENSOR_MAPS["llama"], permute_qk=False)
    monkeypatch.setitem(tensor_maps.TENSOR_MAPS, "llama", broken)
    with pytest.raises(GGUFValidationError, match="KL"):
        save_pretrained_gguf(model, tmp_path / "bad", tokenizer, "f16", validate=True)


def test_llama3_rope_scaling(tiny_tokenizer, tmp_path):
    from fasttune.tiny import build_tiny_model

    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    folder = build_tiny_model("llama", tmp_path / "l3", tokenizer=tiny_tokenizer("llama"), rope_parameters=rope)
    model = lora_model(folder, "llama")
    path = tmp_path / "l3.gguf"
    report = write_gguf(path, merged_state_dict(model, dtype=torch.float32), model.config, tiny_tokenizer("llama"),
                        "f16")
    assert report.tensor_types["rope_freqs.weight"] == "F32"
    result = validate_gguf(path, model, tiny_tokenizer("llama"), max_kl=1e-4, max_abs=5e-3)
    assert result.max_abs_diff < 5e-3, result


def test_sentencepiece_style_tokenizer_matches(tmp_path):
    from spm_tokenizer import build_spm_tokenizer

    from fasttune.tiny import build_tiny_model

    tokenizer = build_spm_tokenizer()
    folder = build_tiny_model("llama", tmp_path / "spm", tokenizer=tokenizer)
    model = lora_model(folder, "llama")
    path = tmp_path / "spm.gguf"
    write_gguf(path, merged_state_dict(model, dtype=torch.float32), model.config, tokenizer, "f16")
    from fasttune.export.llama_cpp import LlamaCppModel

    with LlamaCppModel(path, vocab_only=True) as lm:
        for text in ["Hello world, the quick fox! 42", "  two  spaces", "ünïcödé bytes ✓", "def add(a, b):\n    return"]:
            assert lm.tokenize(text) == tokenizer(text).input_ids, text
    report = validate_gguf(path, model, tokenizer, max_kl=1e-4, max_abs=5e-3)
    assert report.tokens_match


# gpt-oss (window 32, YaRN) in f32: over 300 tokens, f16 rounding flips a near-tied top-4 expert choice of the tiny
# random router at one position (max |diff| 0.07 there, mean KL 7e-7); the f32 file's worst logit is 7e-4 off
@pytest.mark.parametrize("family,ftype", [("gemma2", "f16"), ("gemma3", "f16"), ("gpt_oss", "f32")])
def test_sliding_window_layout_beyond_the_window(family, ftype, merged, tiny_tokenizer, tmp_path):
    model, state = merged(family)
    tokenizer = tiny_tokenizer(family)
    path = tmp_path / "swa.gguf"
    write_gguf(path, state, model.config, tokenizer, ftype)
    prompt = " ".join(f"word{i} is {i * 7 % 13}" for i in range(40))  # far more tokens than the windows (64, 32)
    report = validate_gguf(path, model, tokenizer, prompt=prompt, max_kl=1e-5, max_abs=5e-3)
    assert report.n_tokens > 2 * model.config.sliding_window, report


def test_yarn_rope_scaling(tiny_tokenizer, tmp_path):
    from fasttune.tiny import build_tiny_model

    rope = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 32}
    folder = build_tiny_model("qwen2", tmp_path / "yarn", tokenizer=tiny_tokenizer("qwen2"), rope_parameters=rope,
                              max_position_embeddings=128)
    model = lora_model(folder, "qwen2")
    path = tmp_path / "yarn.gguf"
    write_gguf(path, merged_state_dict(model, dtype=torch.float32), model.config, tiny_tokenizer("qwen2"), "f16")
    prompt = " ".join(f"item {i}" for i in range(30))  # past the original context of 32
    report = validate_gguf(path, model, tiny_tokenizer("qwen2"), prompt=prompt, max_kl=1e-5, max_abs=5e-3)
    assert report.n_tokens > 32, report
