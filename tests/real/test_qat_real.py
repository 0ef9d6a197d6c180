"""QAT on real weights (SmolLM2-135M-Instruct): the fake-quantized merged weights of a q4_k_m QAT LoRA model are,
bit for bit, what the GGUF exporter writes for them (q4_k_m's mix on real shapes: rows of 576 fall back to Q5_0,
ffn_down rows of 1536 are Q4_K or Q6_K)."""

from __future__ import annotations

import pytest
import torch
from gguf import GGMLQuantizationType as Q

from fasttune import FastLanguageModel
from fasttune.export.gguf.reader import gguf_tensors, read_gguf_state
from fasttune.export.gguf.tensor_maps import get_tensor_map, gguf_name
from fasttune.export.gguf.writer import write_gguf
from fasttune.export.merge import iter_merged_tensors
from fasttune.quant import qat

pytestmark = pytest.mark.slow

LAYERS = ("model.layers.0.", "model.layers.4.")  # layer 0: more bits (first eighth); layer 4: the default


def test_qat_q4_k_m_is_the_exported_file_on_real_weights(smollm2_dir, tmp_path, eager_kernels_one_thread):
    model, tok = FastLanguageModel.from_pretrained(str(smollm2_dir), load_in_4bit=False, dtype="float32")
    model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, qat_scheme="q4_k_m", random_state=3)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(4)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.01 * torch.randn(p.shape, generator=gen))
    # the exporter's own path (merge -> writer -> mix -> quantizer) on the embeddings and two layers
    tensors = ((n, t) for n, t in iter_merged_tensors(model, torch.float32)
               if n.startswith(LAYERS) or n == "model.embed_tokens.weight")
    path = tmp_path / "part.gguf"
    write_gguf(path, tensors, model.config, tok, "q4_k_m", tied=True)
    stored = read_gguf_state(path, model.config)
    types = {t.name: Q(t.tensor_type) for t in gguf_tensors(path)}
    base = model.get_base_model()
    plans = {n: p for n, p in qat.layer_plans(model).items() if n.startswith(LAYERS)}
    assert len(plans) == 14
    for name in plans:
        assert torch.equal(qat.fake_weight(base.get_submodule(name)), stored[f"{name}.weight"]), name
    # Q4_K where the row (1536) holds it, its fallback Q5_0 for rows of 576, Q6_K for layer 0's ffn_down (more bits)
    # and that Q6_K's fallback Q8_0 for layer 0's attn_v
    assert {p.qtype for p in plans.values()} == {Q.Q5_0, Q.Q4_K, Q.Q6_K, Q.Q8_0}
    tmap = get_tensor_map("llama")
    for name, plan in plans.items():
        assert types[gguf_name(tmap, f"{name}.weight")[1]] == plan.qtype, name
