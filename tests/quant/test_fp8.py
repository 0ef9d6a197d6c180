"""FP8 weights (fasttune.quant.fp8): exact dequantize-and-multiply, a backward that keeps no dense weight, loading
with load_in_fp8 and from checkpoints stored in FP8 (weight_scale_inv, 128x128 blocks), merges, GRPO, bad input."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import fasttune.quant.fp8 as fp8
from fasttune import FastLanguageModel
from fasttune.config import ConfigError
from fasttune.export.gguf.reader import read_gguf_state
from fasttune.export.merge import merged_state_dict
from fasttune.quant import FP8Linear, dequantize_weight
from fasttune.state import model_state

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root: tests.trl is importable
from tests.trl.trl_helpers import cpu_args  # noqa: E402


@pytest.fixture(autouse=True)
def _eager(eager_kernels_one_thread):
    yield


def _reference_dequant(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float(q) * scale with the scale of each element looked up one block / row at a time (no broadcasting trick)."""
    out = torch.empty(q.shape, dtype=torch.float32)
    rows, cols = q.shape
    if scale.shape == (rows, 1):
        for r in range(rows):
            out[r] = q[r].float() * scale[r, 0]
        return out
    for bi in range(scale.shape[0]):
        for bj in range(scale.shape[1]):
            blk = (slice(bi * 128, (bi + 1) * 128), slice(bj * 128, (bj + 1) * 128))
            out[blk] = q[blk].float() * scale[bi, bj]
    return out


@pytest.mark.parametrize("granularity", ["row", "block"])
def test_quantize_dequantize_is_exact_and_within_e4m3_rounding(granularity):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(300, 200, generator=gen) * 0.05  # not multiples of 128: partial blocks
    w[3, 7] = 2.0  # an outlier: coarsens only its own row / block
    q, scale = fp8.quantize_fp8(w, granularity)
    assert q.dtype == torch.float8_e4m3fn and q.shape == w.shape
    assert scale.shape == ((300, 1) if granularity == "row" else (3, 2))
    deq = fp8.dequantize_fp8(q, scale)
    assert torch.equal(deq, _reference_dequant(q, scale))
    # e4m3: 3 mantissa bits -> relative error <= 2^-4 for normal values; subnormal spacing 2^-9 times the scale
    expanded = _reference_dequant(torch.ones_like(q), scale)
    assert ((deq - w).abs() <= w.abs() * 2**-4 + expanded * 2**-9 + 1e-12).all()
    assert float(q.float().abs().max()) == 448.0  # the largest value of each slice maps onto e4m3's largest


def test_fp8_linear_forward_and_backward_equal_the_dequantized_reference_and_keep_no_dense_weight():
    gen = torch.Generator().manual_seed(1)
    dense = torch.nn.Linear(192, 160, bias=True)
    layer = FP8Linear.from_linear(dense, "block", torch.float32)
    ref_w = layer.dequantized(torch.float32)
    x = torch.randn(5, 7, 192, generator=gen, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    saved: list[torch.Size] = []

    def pack(t):
        saved.append(t.shape)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    y_ref = F.linear(x_ref, ref_w, layer.bias)
    assert torch.equal(y, y_ref)
    grad = torch.randn(y.shape, generator=gen)
    y.backward(grad)
    y_ref.backward(grad)
    assert torch.allclose(x.grad, x_ref.grad, rtol=1e-6, atol=1e-6)
    assert torch.Size([160, 192]) not in saved  # nothing of size (out, in) kept for backward
    assert torch.equal(dequantize_weight(layer), ref_w)


def _param_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


@pytest.mark.slow
def test_load_in_fp8_trains_lora_like_its_dequantized_twin(tiny_model_dir, tmp_path):
    path = str(tiny_model_dir("llama"))
    model, _tok = FastLanguageModel.from_pretrained(path, load_in_fp8=True, dtype="float32", max_seq_length=64)
    layers = [m for m in model.modules() if isinstance(m, FP8Linear)]
    assert len(layers) == 4 * 7 and all(m.weight.dtype == torch.float8_e4m3fn for m in layers)
    assert model_state(model).fp8 == "row"
    assert not isinstance(model.get_output_embeddings(), FP8Linear)  # the head stays in the compute dtype
    dense, _ = FastLanguageModel.from_pretrained(path, load_in_4bit=False, dtype="float32", max_seq_length=64)
    assert _param_bytes(model) < _param_bytes(dense)
    with torch.no_grad():  # the twin: the same values, dequantized, in nn.Linear
        for name, m in model.named_modules():
            if isinstance(m, FP8Linear):
                dense.get_submodule(name).weight.copy_(m.dequantized(torch.float32))
    ids = torch.randint(3, 300, (2, 24), generator=torch.Generator().manual_seed(2))
    losses, grads, pefts = [], [], []
    for m in (model, dense):
        peft = FastLanguageModel.get_peft_model(m, r=8, lora_alpha=16, random_state=5)
        with torch.no_grad():  # non-zero B, the same in both
            gen = torch.Generator().manual_seed(3)
            for n, p in peft.named_parameters():
                if "lora_B" in n:
                    p.copy_(0.05 * torch.randn(p.shape, generator=gen))
        loss = peft(input_ids=ids, labels=ids).loss
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad for n, p in peft.named_parameters() if p.grad is not None})
        pefts.append(peft)
    assert torch.allclose(losses[0], losses[1], rtol=1e-5)
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 2 * 28
    for name, g in grads[0].items():
        assert torch.allclose(g, grads[1][name], rtol=1e-4, atol=1e-6), name
    merged_fp8, merged_dense = (merged_state_dict(p, dtype=torch.float32) for p in pefts)
    assert merged_fp8.keys() == merged_dense.keys()
    for name, t in merged_dense.items():  # the merge dequantizes exactly: the twin's merge, bit for bit
        assert torch.equal(t, merged_fp8[name]), name
    pefts[0].save_pretrained_merged(str(tmp_path / "merged"), _tok)  # the saves go through the same merge
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32)
    key = "model.layers.2.mlp.down_proj.weight"
    assert torch.equal(reloaded.state_dict()[key], merged_fp8[key])
    (gguf,) = pefts[0].save_pretrained_gguf(str(tmp_path / "gguf"), _tok, quantization_method="f32")
    assert torch.equal(read_gguf_state(gguf, model.config)[key], merged_fp8[key])


@pytest.mark.slow
@pytest.mark.parametrize("ask_16bit", [False, True])
def test_a_checkpoint_stored_in_fp8_with_block_scales_loads_as_stored(tiny_model_dir, tmp_path, ask_16bit):
    """A DeepSeek / Qwen3-FP8 style checkpoint, written here: float8 weights + weight_scale_inv (128x128 blocks)."""
    src = Path(tiny_model_dir("llama"))
    folder = tmp_path / "fp8-ckpt"
    folder.mkdir()
    for f in src.iterdir():
        if f.suffix != ".safetensors":
            (folder / f.name).write_bytes(f.read_bytes())
    state = load_file(src / "model.safetensors")
    stored = {}
    for key, value in state.items():
        if ".layers." in key and key.endswith("_proj.weight"):
            q, scale = fp8.quantize_fp8(value, "block")
            stored[key], stored[key + "_scale_inv"] = q, scale
        else:
            stored[key] = value
    save_file(stored, folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                     "weight_block_size": [128, 128]}
    (folder / "config.json").write_text(json.dumps(config))
    model, _ = FastLanguageModel.from_pretrained(str(folder), dtype="float32", load_in_16bit=ask_16bit,
                                                 load_in_4bit=not ask_16bit)
    up = model.get_submodule("model.layers.1.mlp.up_proj")  # (688, 256): 6 x 2 blocks, the last one partial
    key = "model.layers.1.mlp.up_proj.weight"
    reference = _reference_dequant(stored[key], stored[key + "_scale_inv"])
    if ask_16bit:
        assert type(up) is torch.nn.Linear and torch.equal(up.weight, reference)
        assert model_state(model).fp8 is None
    else:
        assert isinstance(up, FP8Linear) and up.granularity == "block"
        assert torch.equal(up.weight.view(torch.uint8), stored[key].view(torch.uint8))  # the stored bytes
        assert torch.equal(up.dequantized(torch.float32), reference)
        assert model_state(model).fp8 == "block"
    ids = torch.randint(3, 300, (1, 16))
    assert torch.isfinite(model(input_ids=ids).logits).all()


@pytest.mark.slow
def test_grpo_rollouts_and_steps_run_on_fp8_weights(tiny_model_dir, tmp_path):
    from datasets import Dataset

    import fasttune.trl as ft

    model, tokenizer = FastLanguageModel.from_pretrained(str(tiny_model_dir("llama")), load_in_fp8="block",
                                                         dtype="float32", max_seq_length=64)
    model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, random_state=7)
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    args = ft.GRPOConfig(**cpu_args(tmp_path, max_steps=1, per_device_train_batch_size=4, num_generations=4,
                                    max_completion_length=8, beta=0.0, loss_type="grpo"))
    trainer = ft.GRPOTrainer(model=model, processing_class=tokenizer,
                             reward_funcs=[lambda completions, **kw: [len(c) / 10 for c in completions]], args=args,
                             train_dataset=Dataset.from_dict({"prompt": [f"Count to {i}:" for i in range(4)]}))
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert logs and all(torch.isfinite(torch.tensor(h["loss"])) for h in logs)
    assert any(m.weight.dtype == torch.float8_e4m3fn for m in model.modules() if isinstance(m, FP8Linear))
    assert any(not torch.equal(p, start[n]) for n, p in model.named_parameters() if n in start)


def test_bad_load_in_fp8_values_name_the_option(monkeypatch):
    with pytest.raises(ConfigError, match=r"load_in_fp8: 'blocks' is not allowed; choose one of \[False, True"):
        FastLanguageModel.from_pretrained("some/model", load_in_fp8="blocks")
    monkeypatch.setattr(fp8, "FP8_DTYPE", None)
    with pytest.raises(ConfigError, match="load_in_fp8=True: this torch .* has no float8_e4m3fn"):
        FastLanguageModel.from_pretrained("some/model", load_in_fp8=True)
    with pytest.raises(ValueError, match="weight_block_size: \\[64, 64\\] is not supported"):
        fp8.fp8_checkpoint_block(type("C", (), {"quantization_config": {"quant_method": "fp8",
                                                                         "weight_block_size": [64, 64]}})())
