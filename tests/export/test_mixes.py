"""Per-tensor type choice (llama.cpp's mixes) and, where llama-cpp-python is installed, agreement with its quantizer."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from fasttune.export.gguf.mixes import FTYPES, choose_tensor_qtype, fallback_reason, tensor_qtype

LAYER_TENSORS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def _types(ftype: str, n_layers: int = 32, cols: int = 4096, **kw) -> dict[str, T]:
    """Types for a llama-like model whose every row length is ``cols``."""
    names = ["token_embd.weight", "output.weight"] + [
        f"blk.{i}.{t}.weight" for i in range(n_layers) for t in LAYER_TENSORS
    ]
    return {n: tensor_qtype(n, (cols, cols), ftype, n_layers, **kw) for n in names}


def _layers_of(types: dict[str, T], tensor: str, qtype: T) -> list[int]:
    return [i for i in range(10_000) if types.get(f"blk.{i}.{tensor}.weight") == qtype]


# q4_k_m / q5_k_m give more bits to layers i < n/8, i >= 7n/8 and (i - n/8) % 3 == 2: for 32 layers that is
MORE_BITS_32 = [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]


@pytest.mark.parametrize(("ftype", "base", "more"), [("q4_k_m", T.Q4_K, T.Q6_K), ("q5_k_m", T.Q5_K, T.Q6_K)])
def test_k_m_mixes_give_attn_v_and_ffn_down_more_bits(ftype, base, more):
    types = _types(ftype)
    assert _layers_of(types, "attn_v", more) == MORE_BITS_32
    assert _layers_of(types, "ffn_down", more) == MORE_BITS_32
    for tensor in ("attn_q", "attn_k", "attn_output", "ffn_gate", "ffn_up"):
        assert _layers_of(types, tensor, base) == list(range(32)), tensor
    assert types["output.weight"] == T.Q6_K and types["token_embd.weight"] == base
    # Llama-2-7B q4_k_m as llama.cpp reports it: 33 tensors Q6_K (16 attn_v + 16 ffn_down + output), the rest Q4_K
    assert sum(t == T.Q6_K for t in types.values()) == 33


def test_q3_k_mixes():
    s, m, ll = _types("q3_k_s"), _types("q3_k_m"), _types("q3_k_l")
    assert set(s.values()) == {T.Q3_K, T.Q6_K} and s["output.weight"] == T.Q6_K
    assert _layers_of(m, "attn_v", T.Q5_K) == [0, 1] and _layers_of(m, "attn_v", T.Q4_K) == list(range(2, 32))
    assert _layers_of(m, "ffn_down", T.Q5_K) == [0, 1]  # i < n/16
    assert _layers_of(m, "ffn_down", T.Q4_K) == list(range(2, 32))
    assert _layers_of(m, "attn_output", T.Q4_K) == list(range(32))
    assert _layers_of(m, "attn_q", T.Q3_K) == list(range(32))
    for tensor in ("attn_v", "ffn_down", "attn_output"):
        assert _layers_of(ll, tensor, T.Q5_K) == list(range(32)), tensor
    assert _layers_of(ll, "ffn_up", T.Q3_K) == list(range(32))


def test_q2_k_mix_depends_on_gqa():
    plain, gqa = _types("q2_k", n_gqa=1), _types("q2_k", n_gqa=4)
    assert _layers_of(plain, "attn_v", T.Q3_K) == list(range(32))
    assert _layers_of(gqa, "attn_v", T.Q4_K) == list(range(32))
    for types in (plain, gqa):
        assert _layers_of(types, "ffn_down", T.Q3_K) == list(range(32))
        assert _layers_of(types, "attn_output", T.Q3_K) == list(range(32))
        assert _layers_of(types, "ffn_gate", T.Q2_K) == list(range(32))
        assert types["output.weight"] == T.Q6_K and types["token_embd.weight"] == T.Q2_K


def test_q4_k_s_and_uniform_mixes():
    s = _types("q4_k_s")
    assert _layers_of(s, "attn_v", T.Q5_K) == [0, 1, 2, 3]
    assert _layers_of(s, "ffn_down", T.Q5_K) == [0, 1, 2, 3]  # i < n/8
    assert _layers_of(s, "attn_q", T.Q4_K) == list(range(32))
    assert set(_types("q5_k_s").values()) == {T.Q5_K, T.Q6_K}
    assert set(_types("q6_k").values()) == {T.Q6_K}
    assert set(_types("q8_0").values()) == {T.Q8_0}  # the output head stays Q8_0 too
    for ftype, qtype in (("q4_0", T.Q4_0), ("q4_1", T.Q4_1), ("q5_0", T.Q5_0), ("q5_1", T.Q5_1)):
        types = _types(ftype)
        assert types.pop("output.weight") == T.Q6_K and set(types.values()) == {qtype}, ftype
    for ftype, qtype in (("f16", T.F16), ("bf16", T.BF16), ("f32", T.F32)):
        assert set(_types(ftype, cols=100).values()) == {qtype}, ftype  # no block, no fallback


def test_tied_embeddings_take_the_output_type():
    assert tensor_qtype("token_embd.weight", (32000, 4096), "q4_k_m", 32, tied_embeddings=True) == T.Q6_K
    assert tensor_qtype("token_embd.weight", (32000, 4096), "q4_k_m", 32) == T.Q4_K
    assert tensor_qtype("token_embd.weight", (32000, 4096), "q8_0", 32, tied_embeddings=True) == T.Q8_0


def test_one_dimensional_and_never_quantized_tensors_stay_f32():
    for ftype in FTYPES:
        assert tensor_qtype("blk.0.attn_norm.weight", (4096,), ftype, 32) == T.F32
        assert tensor_qtype("output_norm.weight", (4096,), ftype, 32) == T.F32
        assert tensor_qtype("blk.0.attn_q.bias", (4096,), ftype, 32) == T.F32
        assert tensor_qtype("blk.0.ffn_gate_inp.weight", (8, 4096), ftype, 32) == T.F32
        assert tensor_qtype("rope_freqs.weight", (64,), ftype, 32) == T.F32


def test_fallbacks_for_row_lengths_the_type_cannot_hold():
    # the tiny models' intermediate size 688 is a multiple of 16 only: every block type falls back to F16
    for ftype in ("q2_k", "q3_k_m", "q4_k_m", "q5_k_s", "q6_k", "q8_0", "q4_0"):
        choice = choose_tensor_qtype("blk.0.ffn_down.weight", (256, 688), ftype, 4)
        assert choice.qtype == T.F16, ftype
        assert choice.reason is not None and "688" in choice.reason and "F16" in choice.reason
    # 1376 = 43 * 32: K types fall back to the 32-block type llama.cpp pairs with them
    expect = {"q2_k": T.Q4_0, "q3_k_s": T.Q4_0, "q4_k_s": T.Q5_0, "q5_k_s": T.Q5_1, "q6_k": T.Q8_0}
    for ftype, qtype in expect.items():
        choice = choose_tensor_qtype("blk.5.ffn_gate.weight", (2752, 1376), ftype, 32)
        assert (choice.planned, choice.qtype) == (FTYPES[ftype][0], qtype), ftype
        assert "1376" in choice.reason and "multiple of 256" in choice.reason and qtype.name in choice.reason
    # the output head planned as Q6_K falls back to Q8_0; with a 32-block default it goes straight to Q8_0
    assert tensor_qtype("output.weight", (1000, 1376), "q4_k_m", 32) == T.Q8_0
    assert choose_tensor_qtype("output.weight", (1000, 1376), "q4_0", 32).planned == T.Q6_K
    assert tensor_qtype("output.weight", (1000, 100), "q4_0", 32) == T.F16
    assert fallback_reason("blk.0.attn_q.weight", (4096, 4096), "q4_k_m", 32) is None


def test_moe_falcon_and_70b_rules():
    assert tensor_qtype("blk.9.attn_v.weight", (1024, 4096), "q4_k_m", 32, n_expert=8) == T.Q8_0
    assert tensor_qtype("blk.9.attn_k.weight", (1024, 4096), "q4_k_m", 32, n_expert=8) == T.Q8_0
    assert tensor_qtype("blk.9.attn_output.weight", (4096, 4096), "q3_k_m", 32, n_expert=8) == T.Q5_K
    assert tensor_qtype("blk.9.ffn_down.weight", (4096, 4096), "q4_k_m", 32, arch="falcon") == T.Q5_K
    assert tensor_qtype("blk.10.ffn_down.weight", (4096, 4096), "q4_k_m", 32, arch="falcon") == T.Q4_K
    assert tensor_qtype("blk.0.ffn_down.weight", (4096, 4096), "q4_k_m", 32, arch="falcon") == T.Q6_K
    assert tensor_qtype("output.weight", (4096, 4096), "q4_k_m", 32, arch="falcon") == T.Q8_0
    # a 70B llama (80 layers, GQA) gives attn_v Q5_K where the mix would say Q3_K/Q4_K
    assert tensor_qtype("blk.40.attn_v.weight", (1024, 8192), "q4_k_m", 80, n_gqa=8) == T.Q5_K
    assert tensor_qtype("blk.40.attn_v.weight", (1024, 8192), "q4_k_m", 80, n_gqa=1) == T.Q4_K


def test_mxfp4_moe_mix():
    """llama.cpp's MXFP4_MOE: expert tensors (3-D, more than one expert) MXFP4, every other matrix Q8_0 (the output
    head and token embeddings too), the router and 1-D tensors F32; a row the 32-block cannot hold falls back to F16."""
    assert tensor_qtype("blk.3.ffn_gate_exps.weight", (32, 2880, 2880), "mxfp4", 24, 32) == T.MXFP4
    assert tensor_qtype("blk.3.ffn_down_exps.weight", (32, 2880, 2880), "mxfp4_moe", 24, 32) == T.MXFP4
    for name, shape in (("blk.3.attn_q.weight", (4096, 2880)), ("output.weight", (201088, 2880)),
                        ("token_embd.weight", (201088, 2880))):
        assert tensor_qtype(name, shape, "mxfp4_moe", 24, 32) == T.Q8_0, name
    assert tensor_qtype("token_embd.weight", (201088, 2880), "mxfp4_moe", 24, 32, tied_embeddings=True) == T.Q8_0
    assert tensor_qtype("blk.3.ffn_gate_inp.weight", (32, 2880), "mxfp4_moe", 24, 32) == T.F32
    assert tensor_qtype("blk.3.ffn_gate_exps.bias", (32, 2880), "mxfp4_moe", 24, 32) == T.F32
    choice = choose_tensor_qtype("blk.0.ffn_down_exps.weight", (8, 256, 176), "mxfp4_moe", 4, 8)
    assert (choice.planned, choice.qtype) == (T.MXFP4, T.F16) and "176" in choice.reason


def test_expert_tensors_follow_the_ffn_rules():
    """A 3-D expert tensor is in its ffn category (ffn_down_exps gets q4_k_m's extra bits like ffn_down)."""
    assert tensor_qtype("blk.0.ffn_down_exps.weight", (8, 4096, 14336), "q4_k_m", 32, 8) == T.Q6_K
    assert tensor_qtype("blk.4.ffn_down_exps.weight", (8, 4096, 14336), "q4_k_m", 32, 8) == T.Q4_K
    assert tensor_qtype("blk.4.ffn_gate_exps.weight", (8, 14336, 4096), "q4_k_m", 32, 8) == T.Q4_K


def test_fused_qkv_follows_attn_v_rules():
    assert tensor_qtype("blk.0.attn_qkv.weight", (9216, 3072), "q4_k_m", 32) == T.Q6_K
    assert tensor_qtype("blk.4.attn_qkv.weight", (9216, 3072), "q4_k_m", 32) == T.Q4_K


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="quantization_method: 'q4_k_x' is not supported; choose one of .*q4_k_m"):
        tensor_qtype("blk.0.attn_q.weight", (256, 256), "q4_k_x", 4)
    with pytest.raises(ValueError, match="layer 7, outside"):
        tensor_qtype("blk.7.attn_v.weight", (256, 256), "q4_k_m", 4)
    with pytest.raises(ValueError, match="n_layers"):
        tensor_qtype("blk.0.attn_v.weight", (256, 256), "q4_k_m", 0)
    assert tensor_qtype("blk.0.attn_q.weight", (256, 256), "Q4_K_M", 4) == T.Q4_K  # names are case-insensitive


# ----------------------------------------------------------------------------------- against llama.cpp itself

HAS_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None
COMPARED_FTYPES = ("q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "q6_k", "q8_0", "q4_0")
TINY = {"n_layers": 4, "hidden": 256, "n_head": 4, "n_kv": 2, "ffn": 688, "vocab": 512}


def _write_f16_llama(path: Path, tied: bool, seed: int = 0) -> dict[str, np.ndarray]:
    """A tiny llama GGUF with f16 matrices (f32 norms) of weight-like values: normal, with a few outlier columns."""
    import gguf

    rng = np.random.default_rng(seed)
    n, h, hd = TINY["n_layers"], TINY["hidden"], TINY["hidden"] // TINY["n_head"]

    def mat(rows: int, cols: int) -> np.ndarray:
        w = rng.standard_normal((rows, cols)) * 0.02
        w[:, rng.choice(cols, size=max(1, cols // 64), replace=False)] *= 8.0
        return w.astype(np.float16)

    tensors = {"token_embd.weight": mat(TINY["vocab"], h), "output_norm.weight": np.ones(h, np.float32)}
    if not tied:
        tensors["output.weight"] = mat(TINY["vocab"], h)
    for i in range(n):
        tensors[f"blk.{i}.attn_norm.weight"] = (1 + 0.1 * rng.standard_normal(h)).astype(np.float32)
        tensors[f"blk.{i}.attn_q.weight"] = mat(h, h)
        tensors[f"blk.{i}.attn_k.weight"] = mat(TINY["n_kv"] * hd, h)
        tensors[f"blk.{i}.attn_v.weight"] = mat(TINY["n_kv"] * hd, h)
        tensors[f"blk.{i}.attn_output.weight"] = mat(h, h)
        tensors[f"blk.{i}.ffn_norm.weight"] = (1 + 0.1 * rng.standard_normal(h)).astype(np.float32)
        tensors[f"blk.{i}.ffn_gate.weight"] = mat(TINY["ffn"], h)
        tensors[f"blk.{i}.ffn_up.weight"] = mat(TINY["ffn"], h)
        tensors[f"blk.{i}.ffn_down.weight"] = mat(h, TINY["ffn"])
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(256)
    writer.add_embedding_length(h)
    writer.add_block_count(n)
    writer.add_feed_forward_length(TINY["ffn"])
    writer.add_head_count(TINY["n_head"])
    writer.add_head_count_kv(TINY["n_kv"])
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(hd)
    writer.add_vocab_size(TINY["vocab"])
    writer.add_file_type(FTYPES["f16"][1])
    for name, value in tensors.items():
        writer.add_tensor(name, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return tensors


def _llama_cpp_quantize(src: Path, dst: Path, ftype: str) -> dict[str, tuple[T, np.ndarray]]:
    import ctypes

    import gguf
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FTYPES[ftype][1]
    params.nthread = 1
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    assert rc == 0, f"llama_model_quantize({ftype}) returned {rc}"
    reader = gguf.GGUFReader(str(dst))
    return {t.name: (T(t.tensor_type), np.array(t.data)) for t in reader.tensors}


@pytest.mark.llama_cpp
@pytest.mark.skipif(not HAS_LLAMA_CPP, reason="llama-cpp-python is not installed")
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_types_and_errors_match_llama_cpp_quantizer(tmp_path, tied):
    from gguf import quants as gguf_quants

    from fasttune.export.gguf.kquants import K_QUANT_TYPES, quantize_k

    src = tmp_path / "f16.gguf"
    tensors = _write_f16_llama(src, tied=tied)
    gqa = TINY["n_head"] // TINY["n_kv"]
    ours_cache: dict[tuple[str, T], np.ndarray] = {}
    worst: dict[str, float] = {}
    for ftype in COMPARED_FTYPES if not tied else ("q4_k_m", "q2_k", "q8_0"):
        theirs = _llama_cpp_quantize(src, tmp_path / f"{ftype}.gguf", ftype)
        assert set(theirs) == set(tensors)
        for name, (their_type, their_data) in theirs.items():
            shape = tensors[name].shape
            our_type = tensor_qtype(name, shape, ftype, TINY["n_layers"], n_gqa=gqa, tied_embeddings=tied)
            if len(shape) == 1:
                assert their_type == T.F32 == our_type, name
                continue
            assert our_type == their_type, f"{ftype} {name}: ours {our_type.name}, llama.cpp {their_type.name}"
            if their_type not in K_QUANT_TYPES:
                continue
            x = tensors[name].astype(np.float32)
            key = (name, their_type)
            if key not in ours_cache:
                ours_cache[key] = quantize_k(x, their_type)
            ours = ours_cache[key]
            assert ours.shape == their_data.shape, name
            err_ours = float(np.sqrt(np.mean((gguf_quants.dequantize(ours, their_type) - x) ** 2)))
            err_theirs = float(np.sqrt(np.mean((gguf_quants.dequantize(their_data, their_type) - x) ** 2)))
            ratio = err_ours / err_theirs
            worst[their_type.name] = max(worst.get(their_type.name, 0.0), ratio)
            assert ratio <= 1.1, f"{ftype} {name} {their_type.name}: error {err_ours:.3e} vs llama.cpp {err_theirs:.3e}"
            same = float(np.mean(ours == their_data))
            assert same >= 0.98, f"{ftype} {name} {their_type.name}: only {same:.1%} of bytes equal llama.cpp's"
    if not tied:
        assert set(worst) == {t.name for t in K_QUANT_TYPES}, worst  # every K type was compared
