"""QAT (fasttune.quant.qat): a GGUF scheme's fake-quantized weights are, bit for bit, what save_pretrained_gguf
writes for the merged model (random tiny weights here, real SmolLM2 weights in tests/real/test_qat_real.py); the
straight-through gradients are those of the reference formula; training runs for LoRA and full fine-tuning; the
torch schemes' grids; bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as Q

from fasttune import FastLanguageModel
from fasttune.config import ConfigError
from fasttune.export.gguf.quants import dequantize, quantize
from fasttune.export.gguf.reader import gguf_tensors, read_gguf_state
from fasttune.export.gguf.tensor_maps import get_tensor_map, gguf_name
from fasttune.quant import is_fake_quantized, qat
from fasttune.state import model_state


@pytest.fixture(autouse=True)
def _eager(eager_kernels_one_thread):
    yield


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q5_0, Q.Q8_0, Q.Q4_K, Q.Q5_K, Q.Q6_K])
def test_fake_quantize_is_the_exporters_round_trip_on_random_weights(qtype):
    gen = torch.Generator().manual_seed(int(qtype))
    w = torch.randn(24, 512, generator=gen) * 0.03
    w[0, :40] *= 20  # an outlier block
    fake = qat.gguf_fake_quantize(w, qtype)
    exported = dequantize(quantize(w.numpy(), qtype), qtype).reshape(w.shape)
    assert np.array_equal(fake.numpy(), exported)
    assert not torch.equal(fake, w)  # it does round


def _qat_lora(path, scheme, dtype="float32"):
    model, tok = FastLanguageModel.from_pretrained(str(path), load_in_4bit=False, dtype=dtype, max_seq_length=64)
    model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, qat_scheme=scheme, random_state=1)
    with torch.no_grad():  # non-zero B: the merged weight differs from the base
        gen = torch.Generator().manual_seed(2)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.02 * torch.randn(p.shape, generator=gen))
    return model, tok


@pytest.mark.slow
@pytest.mark.parametrize("scheme", ["q4_0", "q4_k_m", "q8_0"])
def test_the_exported_gguf_holds_the_fake_quantized_weights_bit_for_bit(tiny_model_dir, tmp_path, scheme):
    """intermediate 512: Q4_K / Q6_K by llama.cpp's q4_k_m mix; 688 (the default) falls back (F16 / Q5_0 rows)."""
    path = tiny_model_dir("llama", intermediate_size=512) if scheme == "q4_k_m" else tiny_model_dir("llama")
    model, tok = _qat_lora(path, scheme)
    plans = qat.layer_plans(model)
    assert len(plans) == 4 * 7 and model_state(model).qat_scheme == scheme
    (file,) = model.save_pretrained_gguf(tmp_path / "gguf", tok, quantization_method=scheme)
    stored = read_gguf_state(file, model.config)
    types = {t.name: Q(t.tensor_type) for t in gguf_tensors(file)}
    tmap = get_tensor_map("llama")
    base = model.get_base_model()
    seen = set()
    for name, plan in plans.items():
        fake = qat.fake_weight(base.get_submodule(name))
        assert torch.equal(fake, stored[f"{name}.weight"]), name
        assert types[gguf_name(tmap, f"{name}.weight")[1]] == plan.qtype, name
        seen.add(plan.qtype)
    expected = {"q4_0": {Q.Q4_0, Q.F16}, "q8_0": {Q.Q8_0, Q.F16}, "q4_k_m": {Q.Q4_K, Q.Q6_K}}[scheme]
    assert seen == expected  # the mix really gives several types, each one followed


@pytest.mark.slow
def test_straight_through_gradients_equal_the_reference_formula(tiny_model_dir):
    model, _ = _qat_lora(tiny_model_dir("llama"), "q4_0")
    layer = model.get_base_model().get_submodule("model.layers.1.self_attn.q_proj")
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(3, 5, 256, generator=gen, requires_grad=True)
    y = layer(x)
    grad = torch.randn(y.shape, generator=gen)
    y.backward(grad)
    got = (x.grad.clone(), a.grad.clone(), b.grad.clone())
    # reference: W' = W + s B A in float32, y = x fq(W')^T, gradient straight through fq
    x_ref = x.detach().clone().requires_grad_(True)
    a_ref, b_ref = a.detach().clone().requires_grad_(True), b.detach().clone().requires_grad_(True)
    merged = layer.base_layer.weight.float() + (b_ref @ a_ref) * layer.scaling["default"]
    fq = torch.from_numpy(dequantize(quantize(merged.detach().numpy(), Q.Q4_0), Q.Q4_0).reshape(merged.shape))
    y_ref = F.linear(x_ref, merged + (fq - merged).detach())
    assert torch.equal(y, y_ref)
    y_ref.backward(grad)
    for what, g, r in zip(("x", "A", "B"), got, (x_ref.grad, a_ref.grad, b_ref.grad)):
        # dA, dB: the reference forms dW' = g^T x first, the Function never does (another summation order)
        assert (g - r).abs().max() <= 1e-5 * r.abs().max(), (what, (g - r).abs().max(), r.abs().max())


@pytest.mark.slow
def test_lora_qat_trains_and_the_cache_follows_the_optimizer(tiny_model_dir):
    model, _ = _qat_lora(tiny_model_dir("llama"), "q4_0")
    layer = model.get_base_model().get_submodule("model.layers.0.mlp.up_proj")
    ids = torch.randint(3, 300, (2, 32), generator=torch.Generator().manual_seed(5))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses, fakes = [], []
    for _ in range(6):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
        fakes.append(qat.fake_weight(layer))
    assert losses[-1] < losses[0] - 0.1
    assert fakes[-1] is qat.fake_weight(layer)  # unchanged weights: the cached value
    assert not torch.equal(fakes[0], fakes[-1])  # each optimizer step re-quantizes the new merged weight
    merged = layer.base_layer.weight.float() + (layer.lora_B["default"].weight @ layer.lora_A["default"].weight) * \
        layer.scaling["default"]
    assert torch.equal(fakes[-1], qat.gguf_fake_quantize(merged.detach(), Q.Q4_0))
    assert qat.remove_qat(model) == 28 and not any(is_fake_quantized(m) for m in model.modules())
    assert torch.isfinite(model(input_ids=ids, labels=ids).loss)


@pytest.mark.slow
def test_full_finetuning_qat_trains_every_weight_through_the_rounding(tiny_model_dir):
    model, _ = FastLanguageModel.from_pretrained(str(tiny_model_dir("llama")), load_in_4bit=False, dtype="float32",
                                                 full_finetuning=True, qat_scheme="q8_0", max_seq_length=64)
    layer = model.get_submodule("model.layers.2.mlp.down_proj")  # rows of 688: F16 in a q8_0 file
    q_proj = model.get_submodule("model.layers.2.self_attn.q_proj")
    assert qat.layer_plans(model)["model.layers.2.mlp.down_proj"].qtype == Q.F16
    ids = torch.randint(3, 300, (2, 32), generator=torch.Generator().manual_seed(6))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert q_proj.weight.grad is not None and q_proj.weight.grad.abs().sum() > 0
    assert torch.equal(qat.fake_weight(q_proj), qat.gguf_fake_quantize(q_proj.weight, Q.Q8_0))
    assert torch.equal(qat.fake_weight(layer), layer.weight.detach().half().float())


def test_torch_scheme_grids():
    gen = torch.Generator().manual_seed(7)
    w = torch.randn(8, 64, generator=gen)
    int4 = qat.int4_fake_quantize(w)
    for row in range(8):
        for g in range(2):
            block, orig = int4[row, 32 * g:32 * (g + 1)], w[row, 32 * g:32 * (g + 1)]
            scale = orig.abs().max() / 7.5
            assert torch.allclose(block / scale, torch.round(block / scale), atol=1e-4)  # integer levels
            assert (block / scale).min() >= -8 - 1e-4 and (block / scale).max() <= 7 + 1e-4
    fp8 = qat.fp8_fake_quantize(w)
    from fasttune.quant.fp8 import dequantize_fp8, quantize_fp8

    assert torch.equal(fp8, dequantize_fp8(*quantize_fp8(w, "row")))  # the FP8 storage's own rounding
    x = torch.randn(4, 6, 64, generator=gen)
    q8 = qat.int8_token_fake_quantize(x)
    assert (q8 - x).abs().max() <= (x.amax(-1) - x.amin(-1)).max() / 255


@pytest.mark.slow
@pytest.mark.parametrize("scheme", qat.TORCH_SCHEMES)
def test_torch_schemes_train_lora(tiny_model_dir, scheme):
    model, _ = _qat_lora(tiny_model_dir("llama", intermediate_size=512), scheme)
    ids = torch.randint(3, 300, (2, 16), generator=torch.Generator().manual_seed(8))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_" in n]
    assert len(grads) == 56 and all(g is not None and torch.isfinite(g).all() for g in grads)
    layer = model.get_base_model().get_submodule("model.layers.0.self_attn.o_proj")
    merged = (layer.base_layer.weight.float() + (layer.lora_B["default"].weight @ layer.lora_A["default"].weight)
              * layer.scaling["default"]).detach()
    expected = qat.fp8_fake_quantize(merged) if scheme == "fp8-fp8" else qat.int4_fake_quantize(merged)
    assert torch.equal(qat.fake_weight(layer), expected)


def test_an_unknown_scheme_lists_the_allowed_ones(tiny_model_dir):
    model, _ = FastLanguageModel.from_pretrained(str(tiny_model_dir("llama")), load_in_4bit=False, dtype="float32")
    with pytest.raises(ConfigError, match=r"qat_scheme: 'q4_k_x' is not a QAT scheme; choose one of \['int4', "
                                          r"'int8-int4', 'fp8-int4', 'fp8-fp8', 'q4_0'.*'q4_k_m'"):
        FastLanguageModel.get_peft_model(model, qat_scheme="q4_k_x")
    with pytest.raises(ConfigError, match="qat_scheme='q4_0' with lora_dropout=0.1"):
        FastLanguageModel.get_peft_model(model, qat_scheme="q4_0", lora_dropout=0.1)
    with pytest.raises(ConfigError, match=r"qat_scheme='q4_0' in from_pretrained is for full fine-tuning"):
        FastLanguageModel.from_pretrained(str(tiny_model_dir("llama")), load_in_4bit=False, qat_scheme="q4_0")
    with pytest.raises(ValueError, match=r"qat_scheme='int4': model.layers.0.mlp.down_proj has rows of 688 values, "
                                         "not a multiple of the int4 group size 32"):
        FastLanguageModel.get_peft_model(model, qat_scheme="int4")
    assert not any("lora_A" in n for n, _ in model.named_parameters())  # refused before peft touched it
    with pytest.raises(ConfigError, match=r"qat_scheme: 'nf4' is not a QAT scheme"):
        FastLanguageModel.from_pretrained(str(tiny_model_dir("llama")), full_finetuning=True, qat_scheme="nf4")


@pytest.mark.slow
def test_qat_on_a_4bit_model_is_refused_naming_the_options(tiny_model_dir):
    model, _ = FastLanguageModel.from_pretrained(str(tiny_model_dir("llama")), load_in_4bit=True, dtype="float32")
    with pytest.raises(ValueError, match=r"qat_scheme='q4_0': the model was loaded in 4-bit .* load_in_4bit=False"):
        FastLanguageModel.get_peft_model(model, qat_scheme="q4_0")
    assert not any("lora_A" in n for n, _ in model.named_parameters())  # refused before peft touched it


@pytest.mark.slow
@pytest.mark.parametrize("scheme", ["int4", "int8-int4", "fp8-fp8"])
def test_convert_qat_gives_the_real_quantized_form_of_what_was_trained(tiny_model_dir, scheme):
    pytest.importorskip("torchao")
    from fasttune.quant import FP8Linear

    model, _ = _qat_lora(tiny_model_dir("llama", intermediate_size=512), scheme)
    model.eval()
    ids = torch.randint(3, 300, (1, 12), generator=torch.Generator().manual_seed(9))
    base = model.get_base_model()
    fakes = {name: qat.fake_weight(base.get_submodule(name)) for name in qat.layer_plans(model)}
    with torch.no_grad():
        trained_logits = model(input_ids=ids).logits
    plain = qat.convert_qat(model)
    assert not hasattr(plain, "peft_config") and not any(is_fake_quantized(m) for m in plain.modules())
    for name, fake in fakes.items():
        layer = plain.get_submodule(name)
        real = layer.dequantized(torch.float32) if scheme == "fp8-fp8" else layer.weight.dequantize()
        assert isinstance(layer, FP8Linear) or type(layer.weight).__module__.startswith("torchao")
        assert torch.equal(real, fake), name  # the trained rounding, bit for bit
    if scheme != "fp8-fp8":  # torchao's int8 dynamic activations are the fake quantizer's too: the same logits
        with torch.no_grad():
            assert torch.allclose(plain(input_ids=ids).logits, trained_logits, rtol=0, atol=1e-5)


def test_convert_qat_of_a_gguf_scheme_points_to_the_gguf_export(tiny_model_dir):
    model, _ = _qat_lora(tiny_model_dir("llama"), "q4_0")
    with pytest.raises(ValueError, match=r"is a GGUF type; its real form is the GGUF file: .*quantization_method='q4_0'"):
        qat.convert_qat(model)


@pytest.mark.slow
def test_scheme_names_are_case_insensitive_and_another_export_type_is_flagged(tiny_model_dir, tmp_path, caplog):
    model, tok = _qat_lora(tiny_model_dir("llama"), " Q4_0")
    assert model_state(model).qat_scheme == "q4_0"
    assert {p.qtype for p in qat.layer_plans(model).values()} == {Q.Q4_0, Q.F16}
    with caplog.at_level("WARNING"):
        model.save_pretrained_gguf(tmp_path / "g", tok, quantization_method=["f16", "q8_0"])
    flagged = [r.getMessage() for r in caplog.records if "trained with qat_scheme='q4_0'" in r.getMessage()]
    assert len(flagged) == 1 and "['q8_0']" in flagged[0]
