"""The rollout's decode-time weights (fasttune.rl.decode) and the sampler's unfiltered path (fasttune.rl.sampling):
parity with the model's own forward and ``model.generate`` for a LoRA model, a 4-bit one and a mixture of experts,
adapters changed between rollouts, every replaced forward put back, and the draws' distribution and log-probs."""

from __future__ import annotations

import pytest
import torch
from test_engine import _check_logprobs, _greedy, _hf_greedy, _ids, _perturb_lora

from fasttune import FastLanguageModel
from fasttune.lora.unwrap import base_model
from fasttune.rl.decode import decode_weights
from fasttune.rl.sampling import SamplingParams, _block_size, draw, sample


def _lora(tiny_model_dir, family="llama", **kwargs):
    model, _ = FastLanguageModel.from_pretrained(str(tiny_model_dir(family)), max_seq_length=128, **kwargs)
    model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, random_state=3)
    _perturb_lora(model, seed=0)
    return model


def _forwards(model) -> dict[str, object]:
    return {name: m.__dict__.get("forward") for name, m in model.named_modules()}


def _check(model, prompts, tokenizer):
    return _check_logprobs(model, prompts, tokenizer, SamplingParams(n=2, temperature=1.0, max_tokens=6, seed=5))


# ---- decode weights against the model's own forward -----------------------------------------------------------------
@pytest.mark.parametrize("dtype,four_bit,atol", [("float32", False, 1e-5), ("float32", True, 1e-5),
                                                 ("bfloat16", False, 0.05)])
def test_decode_weights_give_the_models_logits_and_put_every_forward_back(tiny_model_dir, tiny_tokenizer, dtype,
                                                                          four_bit, atol):
    model = _lora(tiny_model_dir, dtype=dtype, load_in_4bit=four_bit)
    lm = base_model(model)
    ids = torch.tensor(_ids(tiny_tokenizer("llama"))[:1])
    before = _forwards(model)
    model.eval()
    with torch.no_grad():
        want = model(input_ids=ids).logits.float()
        with decode_weights(lm) as replaced:
            got = model(input_ids=ids).logits.float()
    assert replaced == 7 * lm.config.num_hidden_layers  # q, k, v, o, gate, up, down of every layer
    assert _forwards(model) == before  # fused attention / MLP and projection forwards all back
    err = (got - want).abs().max().item()
    assert err <= atol, f"{dtype} 4-bit={four_bit}: logits differ by {err:.2e} (allowed {atol})"
    assert err > 0 or dtype == "float32"  # bf16 runs the unmerged factors: close, not bitwise


def test_decode_weights_are_put_back_after_an_error(tiny_model_dir):
    model = _lora(tiny_model_dir, dtype="float32", load_in_4bit=False)
    before = _forwards(model)
    with pytest.raises(RuntimeError, match="boom"), decode_weights(base_model(model)):
        raise RuntimeError("boom")
    assert _forwards(model) == before


@pytest.mark.parametrize("four_bit", [False, True])
def test_rollouts_match_generate_and_a_full_forward_lora_and_4bit(tiny_model_dir, tiny_tokenizer, four_bit):
    tok = tiny_tokenizer("llama")
    model = _lora(tiny_model_dir, dtype="float32", load_in_4bit=four_bit)
    prompts = _ids(tok)[:3]
    ours = [c.token_ids for c in _greedy(model, prompts, tok, max_tokens=8)]
    assert ours == _hf_greedy(model, prompts, 8, tok.eos_token_id, tok.pad_token_id)
    _check(model, prompts, tok)


def test_moe_rollouts_match_generate_and_a_full_forward(tiny_model_dir, tiny_tokenizer):
    """qwen3_moe with LoRA on attention and experts: the attention projections get decode weights, the grouped
    experts keep their own forward."""
    tok = tiny_tokenizer("qwen3_moe")
    model = _lora(tiny_model_dir, "qwen3_moe", dtype="float32", load_in_4bit=False)
    lm = base_model(model)
    with torch.no_grad(), decode_weights(lm) as replaced:
        assert replaced == 4 * lm.config.num_hidden_layers  # q, k, v, o; the sparse block is left alone
    prompts = _ids(tok)[:3]
    ours = [c.token_ids for c in _greedy(model, prompts, tok, max_tokens=8)]
    assert ours == _hf_greedy(model, prompts, 8, tok.eos_token_id, tok.pad_token_id)
    _check(model, prompts, tok)


def test_an_adapter_changed_between_rollouts_is_used(tiny_model_dir, tiny_tokenizer):
    """Decode weights are built per rollout: the second rollout reads the adapter as an optimizer step left it."""
    tok = tiny_tokenizer("llama")
    model = _lora(tiny_model_dir, dtype="float32", load_in_4bit=True)
    prompts = _ids(tok)[:3]
    first = [c.token_ids for c in _greedy(model, prompts, tok, max_tokens=8)]
    with torch.no_grad():  # an in-place update, as the optimizer makes it
        for name, param in model.named_parameters():
            if "lora_A" in name:
                param.add_(torch.randn_like(param) * 0.5)
    _perturb_lora(model, seed=9, scale=0.3)
    second = [c.token_ids for c in _greedy(model, prompts, tok, max_tokens=8)]
    assert second != first
    assert second == _hf_greedy(model, prompts, 8, tok.eos_token_id, tok.pad_token_id)
    _check(model, prompts, tok)


# ---- the unfiltered sampler -----------------------------------------------------------------------------------------
def test_block_size_divides_the_width():
    assert _block_size(32000) == 256 and _block_size(262144) == 256 and _block_size(640) == 128
    assert _block_size(151936) == 128 and _block_size(32001) == 0 and _block_size(5) == 0


@pytest.mark.parametrize("width", [1024, 640, 997])
def test_draw_follows_the_probabilities_in_blocks(width):
    """Two-level inverse CDF (1024, 640) and the plain one (997): frequencies match, zero-mass columns never come."""
    generator = torch.Generator().manual_seed(width)
    probs = torch.rand(width, generator=generator) ** 4
    probs[::3] = 0.0
    probs[-1] = 0.0
    probs[:8] = torch.tensor([5.0, 0.0, 3.0, 0.0, 2.0, 0.0, 1.0, 0.0])  # most of the mass in the first block
    n = 60_000
    freq = torch.bincount(draw(probs.repeat(n, 1), torch.Generator().manual_seed(1)), minlength=width) / n
    want = probs / probs.sum()
    assert bool((freq[want == 0] == 0).all())
    err = (freq - want).abs().max().item()
    assert err < 0.01, f"width {width}: frequencies differ from the probabilities by {err:.4f}"


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_unfiltered_sampling_distribution_and_logprobs(temperature):
    logits = torch.randn(4, 512, generator=torch.Generator().manual_seed(0)) * 2
    banned = torch.tensor([3, 100, 511])
    logits[:, 100] = 9.0  # a banned token that would otherwise be drawn most
    params = SamplingParams(temperature=temperature)
    rows = logits.repeat(15_000, 1)
    drawn = sample(rows, params, torch.Generator().manual_seed(2), banned=banned, scratch=torch.empty_like(rows))
    assert not bool(torch.isin(drawn.tokens, banned).any())
    torch.testing.assert_close(drawn.logprobs, torch.log_softmax(rows, -1).gather(-1, drawn.tokens[:, None])[:, 0],
                               atol=1e-5, rtol=0)
    want = torch.softmax((logits / temperature).index_fill(-1, banned, float("-inf")), -1)
    for row in range(4):
        freq = torch.bincount(drawn.tokens.view(-1, 4)[:, row], minlength=512) / 15_000
        err = (freq - want[row]).abs().max().item()
        assert err < 0.015, f"T={temperature} row {row}: frequencies differ by {err:.4f}"


def test_unfiltered_sampling_falls_back_when_a_banned_token_takes_all_the_mass():
    logits = torch.full((2, 256), -1000.0)
    logits[:, 7] = 200.0  # exp(-200) underflows: every allowed weight is 0 in the fast path
    logits[:, 9] = 1.0
    drawn = sample(logits, SamplingParams(), torch.Generator().manual_seed(0), banned=torch.tensor([7]))
    assert drawn.tokens.tolist() == [9, 9]
    torch.testing.assert_close(drawn.logprobs, torch.log_softmax(logits, -1)[:, 9])
