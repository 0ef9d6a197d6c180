"""Gemma-3-270M (vocabulary 262144, sliding-window layers): the fused loss keeps its memory bound, packing stays exact
across the 512-token window, and the q8_0 GGUF is right in llama.cpp."""

from __future__ import annotations

import pytest
import torch
from real_samples import REAL_TEXT
from transformers import AutoModelForCausalLM

from fasttune import FastLanguageModel


@pytest.fixture(scope="module")
def gemma(gemma3_dir):
    model, tokenizer = FastLanguageModel.from_pretrained(str(gemma3_dir), dtype=torch.float32, load_in_4bit=False,
                                                         max_seq_length=2048)
    return model, tokenizer


def _long_ids(tokenizer, n: int, shift: int) -> torch.Tensor:
    words = REAL_TEXT.split()
    text = " ".join(words[shift:] + words[:shift])
    ids = tokenizer(" ".join([text] * 8)).input_ids
    assert len(ids) >= n
    return torch.tensor(ids[:n])


def test_fused_loss_never_keeps_the_262k_logits(gemma):
    """What autograd keeps for backward, measured with saved-tensor hooks during a training forward with labels:
    nothing of (tokens x vocabulary); the loss equals cross-entropy over the full logits."""
    model, tokenizer = gemma
    vocab = model.config.vocab_size
    assert vocab == 262144
    peft = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, random_state=0)
    peft.train()
    ids = _long_ids(tokenizer, 384, 0)[None]
    saved: list[int] = []

    def pack(t):
        saved.append(t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = peft(input_ids=ids, labels=ids).loss
    logits_bytes = ids.numel() * vocab * 4
    assert saved and max(saved) < logits_bytes / 16, (max(saved), logits_bytes)
    # the embedding (tied lm_head, 671 MB in fp32) is the one big tensor it may hold; nothing else near the logits
    assert sorted(saved)[-2] < logits_bytes / 16
    loss.backward()
    with torch.no_grad():
        peft.eval()
        hidden = peft.base_model.model.model(input_ids=ids).last_hidden_state[0]
        logits = hidden @ peft.base_model.model.lm_head.weight.T
        want = torch.nn.functional.cross_entropy(logits[:-1].float(), ids[0, 1:])
    assert torch.allclose(loss.detach(), want, rtol=1e-4), (loss.item(), want.item())
    FastLanguageModel.for_inference(peft)
    peft.unload()  # the module's model stays a plain one for the next tests


def test_sliding_window_layers_exact_under_padding_free_packing(gemma3_dir, gemma):
    """Two rows longer than the 512-token window, packed into one padding-free row as PaddingFreeCollator sends it
    (position ids restart, no attention mask, ``use_cache=False``): each row's hidden states equal transformers' on
    that row alone."""
    model, tokenizer = gemma
    assert model.config.sliding_window == 512 and "sliding_attention" in model.config.layer_types
    rows = [_long_ids(tokenizer, 560, 0), _long_ids(tokenizer, 530, 17)]
    packed = torch.cat(rows)[None]
    positions = torch.cat([torch.arange(len(r)) for r in rows])[None]
    model.eval()
    with torch.no_grad():
        got = model.model(input_ids=packed, position_ids=positions, use_cache=False).last_hidden_state[0]
    reference = AutoModelForCausalLM.from_pretrained(gemma3_dir, dtype=torch.float32).eval()
    start = 0
    for row in rows:
        with torch.no_grad():
            want = reference.model(input_ids=row[None]).last_hidden_state[0]
        part = got[start:start + len(row)]
        start += len(row)
        scale = want.abs().max().item()
        assert (part - want).abs().max().item() <= 1e-4 * scale, ((part - want).abs().max().item(), scale)


@pytest.mark.llama_cpp
def test_gguf_export_in_llama_cpp(gemma, tmp_path):
    """The base model read from a GGUF (the package's Q4_K_M, through fasttune.gguf_source) exported again as q8_0:
    llama.cpp tokenizes like the HF tokenizer (262144 entries, Gemma's pre-tokenizer) and its logits match the file's
    own dequantized weights (validate=True), sliding-window layers and all."""
    pytest.importorskip("llama_cpp")
    import gguf

    model, tokenizer = gemma
    path = model.save_pretrained_gguf(str(tmp_path), tokenizer, quantization_method="q8_0", validate=True,
                                      validate_prompt=REAL_TEXT[:300])[0]
    fields = gguf.GGUFReader(str(path)).fields
    assert bytes(fields["general.architecture"].parts[-1]).decode() == "gemma3"
    assert int(fields["gemma3.attention.sliding_window"].parts[-1][0]) == 512
    assert len(fields["tokenizer.ggml.tokens"].data) == 262144
