"""gpt-oss checkpoints as released: experts stored in MXFP4 (``*_blocks`` / ``*_scales``, ``quant_method: mxfp4``).

A tiny gpt-oss is written in that format here (FP4 E2M1 codes, two per byte, low nibble first, one power-of-two scale
per 32 inputs, as transformers' MXFP4 loader reads them). fasttune loads it with the experts dequantized (no MXFP4
kernel trains), to exactly the values the codes mean, then in 4-bit packs them to NF4.
"""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from fasttune import FastLanguageModel
from fasttune.quant.experts import PackedExperts

FP4 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])


def _to_mxfp4(param: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """gpt-oss's ``(E, in, out)`` expert weight -> (blocks ``(E, out, in/32, 16)``, scales ``(E, out, in/32)``, the
    dequantized ``(E, in, out)`` weight those codes mean)."""
    rows = param.transpose(1, 2).float()  # (E, out, in): the checkpoint quantizes each output row along its inputs
    experts, out, width = rows.shape
    groups = rows.reshape(experts, out, width // 32, 32)
    exponent = torch.ceil(torch.log2(groups.abs().amax(-1).clamp(min=1e-30) / 6.0)).clamp(-127, 127)
    scaled = groups / torch.exp2(exponent)[..., None]
    codes = (scaled[..., None] - FP4).abs().argmin(-1).to(torch.uint8)
    blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)
    values = FP4[codes.long()] * torch.exp2(exponent)[..., None]
    return blocks, (exponent + 127).to(torch.uint8), values.reshape(experts, out, width).transpose(1, 2)


def _mxfp4_checkpoint(model_dir, out):
    out.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if (model_dir / name).exists():
            (out / name).write_bytes((model_dir / name).read_bytes())
    state = load_file(model_dir / "model.safetensors")
    expected = {}
    for key in [k for k in state if k.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        blocks, scales, values = _to_mxfp4(state.pop(key))
        state[f"{key}_blocks"], state[f"{key}_scales"] = blocks, scales
        expected[key] = values
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (out / "config.json").write_text(json.dumps(config))
    return expected


def test_mxfp4_checkpoint_loads_dequantized_exactly_then_nf4(tiny_model_dir, tmp_path):
    path = tmp_path / "mxfp4"
    expected = _mxfp4_checkpoint(tiny_model_dir("gpt_oss", intermediate_size=192), path)
    model, _ = FastLanguageModel.from_pretrained(str(path), load_in_4bit=False, dtype="float32")
    params = dict(model.named_parameters())
    assert expected and all(torch.equal(params[key], want) for key, want in expected.items())

    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir("gpt_oss", intermediate_size=192), dtype=torch.float32)
    plain.load_state_dict({**plain.state_dict(), **expected})
    ids = torch.randint(3, 500, (1, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, plain(input_ids=ids).logits, atol=1e-5, rtol=1e-5)

    four, _ = FastLanguageModel.from_pretrained(str(path), dtype="float32")  # load_in_4bit's default
    packed = four.model.layers[0].mlp.experts.gate_up_proj
    assert isinstance(packed, PackedExperts)
    want = PackedExperts.pack(expected["model.layers.0.mlp.experts.gate_up_proj"]).dequantize()
    assert torch.equal(packed.dequantize(), want)  # NF4 of the dequantized MXFP4 values
