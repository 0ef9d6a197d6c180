"""GGUF writing without llama.cpp: names, metadata, permutation maths, norm offset, types, tokenizer, atomicity."""

from __future__ import annotations

import copy
import json
import logging

import numpy as np
import pytest
import torch
from export_helpers import lora_model
from gguf import GGMLQuantizationType, GGUFReader

from fasttune.data.chat import get_chat_template
from fasttune.export import save_pretrained_gguf
from fasttune.export.gguf.mixes import FTYPES
from fasttune.export.gguf.quants import resolve_methods
from fasttune.export.gguf.reader import read_gguf_state, unpermute_rows
from fasttune.export.gguf.tensor_maps import permute_rows
from fasttune.export.gguf.writer import write_gguf
from fasttune.export.merge import merged_state_dict
from fasttune.tiny import FAMILIES


def _field(reader: GGUFReader, key: str):
    return reader.fields[key].contents()


def test_method_names_and_aliases():
    assert resolve_methods("fast_quantized") == [FTYPES["q8_0"]]
    resolved = resolve_methods(["quantized", "Q4_K_M", "not_quantized", "q8_0"])
    assert [t.name for t in resolved] == ["q4_k_m", "f16", "q8_0"]
    assert resolved[0] == (GGMLQuantizationType.Q4_K, 15, "q4_k_m")  # default tensor type, LLAMA_FTYPE, name
    with pytest.raises(ValueError, match="quantization_method: 'q4_k_xl' is not supported; choose one of"):
        resolve_methods("q4_k_xl")
    with pytest.raises(ValueError, match="empty"):
        resolve_methods([])
    with pytest.raises(TypeError, match=r"quantization_method: item 1 of the list is 8 \(int\); pass a method name"):
        resolve_methods(["q8_0", 8])
    with pytest.raises(TypeError, match=r"quantization_method: got \{'q8_0'\} \(set\); pass a method name"):
        resolve_methods({"q8_0"})


@pytest.mark.parametrize("family", FAMILIES)
def test_f16_round_trip_and_metadata(family, merged, tiny_tokenizer, tmp_path):
    model, state = merged(family)
    path = tmp_path / "m.gguf"
    write_gguf(path, state, model.config, tiny_tokenizer(family), "f16")
    back = read_gguf_state(path, model.config)
    for name, tensor in state.items():
        err = (back[name] - tensor).abs().max().item()
        assert err <= 1e-3 * max(1.0, tensor.abs().max().item()), f"{family} {name}: f16 round trip off by {err}"
    reader = GGUFReader(path)
    arch = _field(reader, "general.architecture")
    assert arch == {"mistral": "llama", "mixtral": "llama", "qwen3_moe": "qwen3moe", "gpt_oss": "gpt-oss"}.get(family, family)
    cfg = model.config
    assert _field(reader, f"{arch}.block_count") == cfg.num_hidden_layers
    assert _field(reader, f"{arch}.attention.head_count_kv") == cfg.num_key_value_heads
    assert len(_field(reader, "tokenizer.ggml.tokens")) == cfg.vocab_size
    assert ("output.weight" in {t.name for t in reader.tensors}) == (not cfg.tie_word_embeddings)
    if family == "gemma2":
        assert _field(reader, "gemma2.attn_logit_softcapping") == pytest.approx(50.0)
        assert _field(reader, "gemma2.final_logit_softcapping") == pytest.approx(30.0)
        assert _field(reader, "gemma2.attention.sliding_window") == 64
        assert list(_field(reader, "gemma2.attention.sliding_window_pattern")) == [True, False, True, False]
    if family == "gemma3":
        assert _field(reader, "gemma3.rope.freq_base") == pytest.approx(1e6)
        assert _field(reader, "gemma3.rope.freq_base_swa") == pytest.approx(1e4)
    if family == "phi3":
        assert {t.name for t in reader.tensors} >= {"blk.0.attn_qkv.weight", "blk.0.ffn_up.weight"}
        assert _field(reader, "phi3.rope.scaling.original_context_length") == 4096
    if family in MOE_WIDTH:  # experts in llama.cpp's layout: (E, I, H) gate/up, (E, H, I) down; the router's (E, H)
        shapes = {t.name: tuple(int(d) for d in reversed(t.shape)) for t in reader.tensors}
        n_exp, width, hidden = cfg.num_local_experts, getattr(cfg, MOE_WIDTH[family]), cfg.hidden_size
        assert shapes["blk.1.ffn_gate_exps.weight"] == shapes["blk.1.ffn_up_exps.weight"] == (n_exp, width, hidden)
        assert shapes["blk.1.ffn_down_exps.weight"] == (n_exp, hidden, width)
        assert shapes["blk.1.ffn_gate_inp.weight"] == (n_exp, hidden)
        assert _field(reader, f"{arch}.expert_count") == n_exp
        assert _field(reader, f"{arch}.expert_used_count") == cfg.num_experts_per_tok
        assert (f"{arch}.expert_feed_forward_length" in reader.fields) == (arch != "llama")
    if family == "gpt_oss":
        assert _field(reader, "gpt-oss.attention.sliding_window") == 32
        assert list(_field(reader, "gpt-oss.attention.sliding_window_pattern")) == [True, False, True, False]
        assert _field(reader, "gpt-oss.rope.scaling.factor") == pytest.approx(32.0)
        assert _field(reader, "gpt-oss.rope.scaling.original_context_length") == 4096
        assert {"blk.0.attn_sinks.weight", "blk.0.ffn_gate_inp.bias", "blk.0.ffn_up_exps.bias",
                "blk.0.post_attention_norm.weight"} <= {t.name for t in reader.tensors}


# config attribute of each MoE family's expert width
MOE_WIDTH = {"qwen3_moe": "moe_intermediate_size", "mixtral": "intermediate_size", "gpt_oss": "intermediate_size"}


def test_expert_split_and_join_follow_transformers_layouts():
    """gpt-oss's (E, H, 2I) gate_up with gate/up interleaved, Qwen3-MoE's (E, 2I, H) with gate then up: the GGUF parts
    are the (E, I, H) matrices transformers' experts multiply by, and joining them gives the tensor back."""
    from fasttune.export.gguf.tensor_maps import get_tensor_map, join_tensor, split_tensor

    rng = np.random.default_rng(0)
    n_exp, hidden, width = 3, 8, 6
    fused = rng.standard_normal((n_exp, hidden, 2 * width)).astype(np.float32)  # gpt-oss: x @ W, (in, out)
    split = get_tensor_map("gpt_oss").names["model.layers.{}.mlp.experts.gate_up_proj"]
    (gate_name, gate), (up_name, up) = split_tensor(split, fused)
    assert (gate_name, up_name) == ("blk.{}.ffn_gate_exps.weight", "blk.{}.ffn_up_exps.weight")
    np.testing.assert_array_equal(gate, fused[..., ::2].swapaxes(1, 2))
    np.testing.assert_array_equal(up, fused[..., 1::2].swapaxes(1, 2))
    np.testing.assert_array_equal(join_tensor(split, [gate, up]), fused)
    bias = rng.standard_normal((n_exp, 2 * width)).astype(np.float32)
    bias_split = get_tensor_map("gpt_oss").names["model.layers.{}.mlp.experts.gate_up_proj_bias"]
    parts = [p for _, p in split_tensor(bias_split, bias)]
    np.testing.assert_array_equal(parts[1], bias[:, 1::2])
    np.testing.assert_array_equal(join_tensor(bias_split, parts), bias)
    halves = rng.standard_normal((n_exp, 2 * width, hidden)).astype(np.float32)  # Qwen3-MoE: (out, in), gate first
    qsplit = get_tensor_map("qwen3_moe").names["model.layers.{}.mlp.experts.gate_up_proj"]
    (_, gate), (_, up) = split_tensor(qsplit, halves)
    np.testing.assert_array_equal(gate, halves[:, :width])
    np.testing.assert_array_equal(up, halves[:, width:])
    np.testing.assert_array_equal(join_tensor(qsplit, [gate, up]), halves)


def test_config_values_llama_cpp_hard_codes_are_checked(merged, tiny_tokenizer, tmp_path):
    model, state = merged("qwen3_moe")
    config = copy.deepcopy(model.config)
    config.norm_topk_prob = False  # llama.cpp's qwen3moe always renormalises the top-k weights
    with pytest.raises(ValueError, match=r"config.norm_topk_prob: False; llama.cpp's qwen3moe architecture always"):
        write_gguf(tmp_path / "x.gguf", state, config, tiny_tokenizer("qwen3_moe"), "f16")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("family", ["gemma", "gemma3"])
def test_gemma_norms_have_one_added(family, merged, tiny_tokenizer, tmp_path):
    model, state = merged(family)
    path = tmp_path / "g.gguf"
    write_gguf(path, state, model.config, tiny_tokenizer(family), "f32")
    raw = {t.name: np.array(t.data) for t in GGUFReader(path).tensors}
    np.testing.assert_allclose(raw["output_norm.weight"], state["model.norm.weight"].numpy() + 1, rtol=0, atol=1e-7)
    np.testing.assert_allclose(raw["blk.1.attn_norm.weight"],
                               state["model.layers.1.input_layernorm.weight"].numpy() + 1, rtol=0, atol=1e-7)
    if family == "gemma3":
        np.testing.assert_allclose(raw["blk.0.attn_k_norm.weight"],
                                   state["model.layers.0.self_attn.k_norm.weight"].numpy() + 1, atol=1e-7)


def _rope_half(x, pos, base=10000.0):
    """transformers' rotate-half RoPE on (seq, heads, d)."""
    d = x.shape[-1]
    inv = base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = pos[:, None].double() * inv[None]
    cos, sin = torch.cat([ang.cos(), ang.cos()], -1)[:, None], torch.cat([ang.sin(), ang.sin()], -1)[:, None]
    rot = torch.cat([-x[..., d // 2:], x[..., : d // 2]], -1)
    return x * cos + rot * sin


def _rope_interleaved(x, pos, base=10000.0):
    """llama.cpp's "normal" RoPE on adjacent pairs (x0, x1), (x2, x3), ... of (seq, heads, d)."""
    d = x.shape[-1]
    inv = base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = pos[:, None].double() * inv[None]
    cos, sin = ang.cos()[:, None], ang.sin()[:, None]
    even, odd = x[..., 0::2], x[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = even * cos - odd * sin
    out[..., 1::2] = even * sin + odd * cos
    return out


def test_qk_permutation_turns_rotate_half_into_interleaved_rope():
    torch.manual_seed(0)
    heads, d, hidden, seq = 4, 16, 32, 5
    w = torch.randn(heads * d, hidden, dtype=torch.float64)
    x = torch.randn(seq, hidden, dtype=torch.float64)
    pos = torch.arange(seq)
    q_hf = _rope_half((x @ w.T).view(seq, heads, d), pos)
    q_cpp = _rope_interleaved((x @ torch.from_numpy(permute_rows(w.numpy(), heads)).T).view(seq, heads, d), pos)
    scores_hf = torch.einsum("shd,thd->hst", q_hf, q_hf)
    scores_cpp = torch.einsum("shd,thd->hst", q_cpp, q_cpp)
    torch.testing.assert_close(scores_cpp, scores_hf)  # attention scores are what both implementations compute
    np.testing.assert_array_equal(unpermute_rows(permute_rows(w.numpy(), heads), heads), w.numpy())
    wrong = _rope_interleaved((x @ w.T).view(seq, heads, d), pos)
    assert not torch.allclose(torch.einsum("shd,thd->hst", wrong, wrong), scores_hf)


# (type, worst relative Frobenius error of a dequantized 2-D weight)
QUANT_BOUNDS = [("q8_0", 0.01), ("q5_1", 0.04), ("q5_0", 0.05), ("q4_1", 0.08), ("q4_0", 0.1), ("bf16", 0.005)]


@pytest.mark.parametrize("ftype,bound", QUANT_BOUNDS)
def test_gguf_numpy_types(ftype, bound, merged, tiny_tokenizer, tmp_path):
    model, state = merged("qwen2")
    path = tmp_path / f"{ftype}.gguf"
    report = write_gguf(path, state, model.config, tiny_tokenizer("qwen2"), ftype)
    assert report.tensor_types["blk.0.attn_q.weight"] == ftype.upper()
    assert report.tensor_types["blk.0.attn_norm.weight"] == "F32"
    assert report.tensor_types["blk.0.attn_q.bias"] == "F32"
    back = read_gguf_state(path, model.config)
    for name, tensor in state.items():
        if tensor.ndim == 2:
            rel = ((back[name] - tensor).norm() / tensor.norm()).item()
            assert rel < bound, f"{ftype} {name}: relative error {rel:.4f} > {bound}"


def test_k_quant_mix_and_fallback_logged(merged, tiny_tokenizer, tmp_path, caplog):
    model, state = merged("llama")
    with caplog.at_level(logging.WARNING, logger="fasttune.export.gguf.writer"):
        report = write_gguf(tmp_path / "k.gguf", state, model.config, tiny_tokenizer("llama"), "q4_k_m")
    assert report.tensor_types["blk.0.attn_q.weight"] == "Q4_K"
    assert report.tensor_types["output.weight"] == "Q6_K"
    assert report.tensor_types["blk.0.ffn_down.weight"] == "F16"  # 688 columns: neither 256 nor 32 divides it
    assert len(report.fallbacks) == model.config.num_hidden_layers > 1
    lines = [r.message for r in caplog.records if "falling back" in r.message]
    assert len(lines) == 1, lines  # one line for all of them, not one per tensor
    assert lines[0].startswith(f"gguf: {model.config.num_hidden_layers} of {len(report.tensor_types)} tensors of k.gguf")
    assert "blk.0.ffn_down.weight: row length 688 is not a multiple of 256" in lines[0]
    back = read_gguf_state(tmp_path / "k.gguf", model.config)
    rel = ((back["model.layers.0.self_attn.q_proj.weight"] - state["model.layers.0.self_attn.q_proj.weight"]).norm()
           / state["model.layers.0.self_attn.q_proj.weight"].norm()).item()
    assert rel < 0.12


def test_tokenizer_metadata(merged, tiny_tokenizer, tmp_path):
    model, state = merged("llama")
    tokenizer = get_chat_template(tiny_tokenizer("llama"), "llama-3.1")
    path = tmp_path / "t.gguf"
    write_gguf(path, state, model.config, tokenizer, "q8_0", template=tokenizer.fasttune_template)
    reader = GGUFReader(path)
    tokens = _field(reader, "tokenizer.ggml.tokens")
    assert _field(reader, "tokenizer.ggml.model") == "gpt2" and _field(reader, "tokenizer.ggml.pre") == "gpt-2"
    assert tokens[tokenizer.convert_tokens_to_ids("<|eot_id|>")] == "<|eot_id|>"
    assert tokens[len(tokenizer)] == f"[PAD{len(tokenizer)}]"
    types = _field(reader, "tokenizer.ggml.token_type")
    assert types[tokenizer.convert_tokens_to_ids("<|eot_id|>")] == 3 and types[-1] == 5
    assert _field(reader, "tokenizer.ggml.eot_token_id") == tokenizer.convert_tokens_to_ids("<|eot_id|>")
    assert _field(reader, "tokenizer.ggml.bos_token_id") == tokenizer.bos_token_id
    assert _field(reader, "tokenizer.ggml.add_bos_token") is True
    assert _field(reader, "tokenizer.chat_template") == tokenizer.chat_template
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    assert list(_field(reader, "tokenizer.ggml.merges")) == [" ".join(m) for m in spec["model"]["merges"]]


def test_save_pretrained_gguf_files_modelfile_and_errors(tiny_model_dir, tiny_tokenizer, tmp_path):
    model = lora_model(tiny_model_dir("qwen2"), "qwen2")
    tokenizer = get_chat_template(tiny_tokenizer("qwen2"), "qwen-2.5")
    paths = save_pretrained_gguf(model, tmp_path / "out", tokenizer, quantization_method=["fast_quantized", "q4_0"])
    assert [p.name for p in paths] == ["model.Q8_0.gguf", "model.Q4_0.gguf"]
    modelfile = (tmp_path / "out" / "Modelfile").read_text()
    assert modelfile.startswith("FROM ./model.Q8_0.gguf") and 'PARAMETER stop "<|im_end|>"' in modelfile
    with pytest.raises(ValueError, match="tokenizer: a GGUF file needs the tokenizer"):
        save_pretrained_gguf(model, tmp_path / "x", None)
    with pytest.raises(TypeError, match="unexpected keyword"):
        save_pretrained_gguf(model, tmp_path / "x", tokenizer, quantisation="q8_0")
    with torch.no_grad():
        model.base_model.model.model.layers[0].self_attn.v_proj.lora_B["default"].weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match="inf"):
        save_pretrained_gguf(model, tmp_path / "out", tokenizer, quantization_method="f16")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["Modelfile", "model.Q4_0.gguf", "model.Q8_0.gguf"]


def test_interrupted_write_leaves_no_file(merged, tiny_tokenizer, tmp_path):
    model, state = merged("llama")
    bad = dict(state)
    bad["model.layers.0.mlp.extra_proj.weight"] = torch.zeros(4, 4)
    with pytest.raises(KeyError, match="extra_proj"):
        write_gguf(tmp_path / "bad.gguf", bad, model.config, tiny_tokenizer("llama"), "q8_0")
    assert list(tmp_path.iterdir()) == []


def test_sentencepiece_style_vocab():
    from spm_tokenizer import build_spm_tokenizer

    from fasttune.export.gguf.tokenizer import build_vocab

    tokenizer = build_spm_tokenizer()
    vocab = build_vocab(tokenizer, n_vocab=448)
    assert vocab.model == "llama" and vocab.pre is None and vocab.merges == []
    assert vocab.add_space_prefix is True and vocab.add_bos is True
    byte_id = tokenizer.convert_tokens_to_ids("<0x41>")
    assert vocab.types[byte_id] == 6 and vocab.types[tokenizer.unk_token_id] == 2 and vocab.types[447] == 5
    assert vocab.types[tokenizer.convert_tokens_to_ids("<s>")] == 3
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    assert len(merges) > 50
    first: dict[str, int] = {}
    for rank, (left, right) in enumerate(merges):
        first.setdefault(left + right, rank)
    for token, rank in first.items():  # llama.cpp merges the highest score first, BPE the lowest rank
        assert vocab.scores[tokenizer.convert_tokens_to_ids(token)] == -rank, token


def test_4bit_base_streams_into_gguf(tiny_model_dir, tiny_tokenizer, tmp_path):
    model = lora_model(tiny_model_dir("llama"), "llama", four_bit=True)
    paths = save_pretrained_gguf(model, tmp_path, tiny_tokenizer("llama"), "f32", write_modelfile=False)
    back = read_gguf_state(paths[0], model.config)
    for name, tensor in merged_state_dict(model, dtype=torch.float32).items():
        assert torch.equal(back[name], tensor), name  # f32 file: the exact dequantized-and-merged weights
