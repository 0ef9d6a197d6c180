"""The rollout engine (fasttune.rl.engine / sampling / outputs): parity with ``model.generate``, the sampling filters
against their full-vocabulary reference, stopping, log-probs, and that the model is left exactly as it was found."""

from __future__ import annotations

import itertools

import pytest
import torch
from transformers import AutoModelForCausalLM

from fasttune import FastLanguageModel
from fasttune.config import ConfigError
from fasttune.lora.unwrap import base_model
from fasttune.patch.checkpointing import is_checkpointing, remembered_mode
from fasttune.rl.engine import generate, generate_ids
from fasttune.rl.outputs import RequestOutput
from fasttune.rl.sampling import SamplingParams, candidates, draw, filter_logits, sample

PROMPTS = ["The quick brown fox", "Hello", "def add(a, b):\n    return", "You are a helpful assistant. What is"]


# ---- fixtures -------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer):
    return tiny_tokenizer("llama")


@pytest.fixture(scope="module")
def plain_model(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(str(tiny_model_dir("llama")), dtype=torch.float32).eval()


def _perturb_lora(model, seed: int, scale: float = 0.1) -> None:
    """Nonzero lora_B (a fresh adapter computes nothing), so the adapter changes the output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * scale)


@pytest.fixture(scope="module")
def lora_model(tiny_model_dir):
    """The GRPO notebook's model: fasttune fast path + LoRA, "unsloth" checkpointing remembered, train mode."""
    model, tokenizer = FastLanguageModel.from_pretrained(str(tiny_model_dir("llama")), max_seq_length=128,
                                                         load_in_4bit=False, dtype="float32")
    model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, random_state=3)
    _perturb_lora(model, seed=0)
    return model


def _ids(tokenizer, texts=PROMPTS) -> list[list[int]]:
    return [tokenizer(t)["input_ids"] for t in texts]


def _hf_greedy(model, prompts: list[list[int]], max_new: int, eos: int, pad: int) -> list[list[int]]:
    """``model.generate(do_sample=False)`` on left-padded prompts, each cut after its first eos (kept)."""
    width = max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts]).to(model.device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts]).to(model.device)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new,
                             eos_token_id=eos, pad_token_id=pad, use_cache=True)
    model.train(was_training)
    rows = []
    for row in out[:, width:].tolist():
        rows.append(row[:row.index(eos) + 1] if eos in row else row)
    return rows


def _greedy(model, prompts, tokenizer, max_tokens=10, **kwargs):
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, **kwargs)
    outs = generate_ids(model, prompts, params, eos_token_ids=[tokenizer.eos_token_id],
                        pad_token_id=tokenizer.pad_token_id, tokenizer=tokenizer)
    return [per_prompt[0] for per_prompt in outs]


# ---- parity with model.generate -------------------------------------------------------------------------------------
def test_greedy_matches_generate_plain_model_batch_of_lengths(plain_model, tokenizer):
    prompts = _ids(tokenizer)
    assert len({len(p) for p in prompts}) > 1  # left padding is exercised
    ours = [c.token_ids for c in _greedy(plain_model, prompts, tokenizer, max_tokens=12)]
    assert ours == _hf_greedy(plain_model, prompts, 12, tokenizer.eos_token_id, tokenizer.pad_token_id)


def test_greedy_matches_generate_fasttune_lora_and_uses_live_adapter(lora_model, tokenizer):
    prompts = _ids(tokenizer)
    ours = [c.token_ids for c in _greedy(lora_model, prompts, tokenizer, max_tokens=12)]
    assert ours == _hf_greedy(lora_model, prompts, 12, tokenizer.eos_token_id, tokenizer.pad_token_id)
    saved = {n: p.detach().clone() for n, p in lora_model.named_parameters() if "lora_B" in n}
    try:
        _perturb_lora(lora_model, seed=1, scale=0.3)
        changed = [c.token_ids for c in _greedy(lora_model, prompts, tokenizer, max_tokens=12)]
        assert changed != ours  # the adapter's current weights are used (nothing merged or cached)
        assert changed == _hf_greedy(lora_model, prompts, 12, tokenizer.eos_token_id, tokenizer.pad_token_id)
    finally:
        with torch.no_grad():
            for name, param in lora_model.named_parameters():
                if name in saved:
                    param.copy_(saved[name])


def test_cache_growth_keeps_parity(plain_model, tokenizer, monkeypatch):
    """A cache that starts with room for 3 new tokens and doubles when full generates what model.generate does."""
    import fasttune.rl.engine as engine

    monkeypatch.setattr(engine, "FIRST_ALLOCATION", 3)
    prompts = _ids(tokenizer)
    ours = [c.token_ids for c in _greedy(plain_model, prompts, tokenizer, max_tokens=12)]
    assert ours == _hf_greedy(plain_model, prompts, 12, tokenizer.eos_token_id, tokenizer.pad_token_id)


def test_growing_layer_keeps_its_contents():
    from fasttune.rl.engine import GrowingLayer

    layer = GrowingLayer(capacity=3, limit=7)
    k, v = torch.randn(4, 2, 2, 5), torch.randn(4, 2, 2, 3)  # value head_dim may differ from the key's
    layer.update(k, v)
    k2, v2 = torch.randn(4, 2, 3, 5), torch.randn(4, 2, 3, 3)
    keys, values = layer.update(k2, v2)  # 5 > 3: grows to 6
    assert layer.capacity == 6 and layer.get_seq_length() == 5
    torch.testing.assert_close(keys, torch.cat([k, k2], 2), rtol=0, atol=0)
    layer.batch_select_indices(torch.tensor([3, 1]))
    torch.testing.assert_close(layer.values, torch.cat([v, v2], 2)[[3, 1]], rtol=0, atol=0)
    layer.update(torch.randn(2, 2, 2, 5), torch.randn(2, 2, 2, 3))
    assert layer.capacity == 7
    with pytest.raises(RuntimeError, match="8 positions are more than the 7"):
        layer.update(torch.randn(2, 2, 1, 5), torch.randn(2, 2, 1, 3))


@pytest.mark.parametrize("family", ["qwen2", "gemma2", "qwen3_moe", "gpt_oss"])
def test_greedy_matches_generate_other_families(family, tiny_model_dir, tiny_tokenizer):
    """qwen2 (biases), gemma2 (sliding-window layers, logit softcapping) and two mixtures of experts (the grouped
    experts in every decode step; gpt-oss: sinks, alternating windows) through the fasttune loader."""
    tok = tiny_tokenizer(family)
    model, _ = FastLanguageModel.from_pretrained(str(tiny_model_dir(family)), load_in_4bit=False, dtype="float32")
    prompts = _ids(tok)
    ours = [c.token_ids for c in _greedy(model, prompts, tok, max_tokens=8)]
    assert ours == _hf_greedy(model, prompts, 8, tok.eos_token_id, tok.pad_token_id)


def test_4bit_fasttune_model_generates(tiny_model_dir, tokenizer):
    model, _ = FastLanguageModel.from_pretrained(str(tiny_model_dir("llama")), load_in_4bit=True)
    model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16)
    _perturb_lora(model, seed=0)
    prompts = _ids(tokenizer)[:2]
    ours = [c.token_ids for c in _greedy(model, prompts, tokenizer, max_tokens=6)]
    assert ours == _hf_greedy(model, prompts, 6, tokenizer.eos_token_id, tokenizer.pad_token_id)


# ---- the model is left as it was found ------------------------------------------------------------------------------
def test_mid_training_state_is_restored_and_training_continues(lora_model, tokenizer):
    lora_model.train()
    inner = base_model(lora_model)
    inner.lm_head.eval()  # a submodule deliberately in another mode must stay so
    before = {name: m.training for name, m in lora_model.named_modules()}
    assert is_checkpointing(lora_model) and remembered_mode(lora_model) == "unsloth"
    use_cache = inner.config.use_cache
    try:
        params = SamplingParams(n=2, max_tokens=5, seed=0)
        generate_ids(lora_model, _ids(tokenizer)[:2], params, eos_token_ids=[tokenizer.eos_token_id],
                     pad_token_id=tokenizer.pad_token_id)
        assert {name: m.training for name, m in lora_model.named_modules()} == before
        assert is_checkpointing(lora_model) and remembered_mode(lora_model) == "unsloth"
        assert inner.config.use_cache == use_cache
        ids = torch.tensor([_ids(tokenizer)[0]])
        loss = lora_model(input_ids=ids, labels=ids).loss
        loss.backward()  # nothing built during the rollout got in the way of autograd
        grads = [p.grad for n, p in lora_model.named_parameters() if "lora_A" in n]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
    finally:
        lora_model.zero_grad(set_to_none=True)
        inner.lm_head.train()


# ---- log-probs ------------------------------------------------------------------------------------------------------
def _check_logprobs(model, prompts, tokenizer, params, atol=1e-4):
    """Sampled completions' log-probs == log_softmax of a full forward of prompt + completion; returns them."""
    outs = generate_ids(model, prompts, params, eos_token_ids=[tokenizer.eos_token_id],
                        pad_token_id=tokenizer.pad_token_id)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for prompt, per_prompt in zip(prompts, outs):
            for c in per_prompt:
                ids = torch.tensor([prompt + c.token_ids])
                logits = model(input_ids=ids).logits[0].float()
                want = torch.log_softmax(logits[len(prompt) - 1:-1], -1).gather(-1, ids[0, len(prompt):, None])[:, 0]
                torch.testing.assert_close(torch.tensor(c.logprobs), want, atol=atol, rtol=atol)
                assert c.cumulative_logprob == pytest.approx(float(want.sum()), abs=10 * atol)
    model.train(was_training)
    return outs


def test_logprobs_equal_log_softmax_of_a_full_forward(lora_model, tokenizer):
    _check_logprobs(lora_model, _ids(tokenizer)[:3], tokenizer, SamplingParams(n=2, temperature=1.0, max_tokens=6,
                                                                              seed=3))


# ---- the sampling filters against their reference -------------------------------------------------------------------
def test_top_k_1_is_greedy():
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0)) * 3
    drawn = sample(logits, SamplingParams(temperature=1.3, top_k=1), torch.Generator().manual_seed(1))
    assert drawn.tokens.tolist() == logits.argmax(-1).tolist()


def test_top_p_and_min_p_keep_the_right_tokens():
    probs = torch.tensor([[0.5, 0.25, 0.15, 0.06, 0.04]])
    logits = probs.log()

    def kept(**kw):
        return torch.isfinite(filter_logits(logits, **kw))[0].nonzero()[:, 0].tolist()

    assert kept(top_p=0.5) == [0]  # 0.5 reaches 0.5
    assert kept(top_p=0.6) == [0, 1]  # the token that crosses top_p is kept
    assert kept(top_p=0.9) == [0, 1, 2]
    assert kept(top_p=0.91) == [0, 1, 2, 3]
    assert kept(min_p=0.29) == [0, 1, 2]  # cut-off 0.145
    assert kept(min_p=0.31) == [0, 1]  # cut-off 0.155
    assert kept(min_p=0.1) == [0, 1, 2, 3]  # 0.05 cut-off
    assert kept(top_k=3) == [0, 1, 2]
    # top-p after min-p and top-k works on the renormalised remainder: {0.5, 0.25, 0.15} -> 0.556, 0.278, 0.167
    assert kept(top_k=3, top_p=0.8) == [0, 1]
    assert kept(top_k=3, top_p=0.84) == [0, 1, 2]
    for seed in range(20):  # draws only ever land in the kept set
        drawn = sample(logits.repeat(64, 1), SamplingParams(top_p=0.6), torch.Generator().manual_seed(seed))
        assert set(drawn.tokens.tolist()) <= {0, 1}


@pytest.mark.parametrize("vocab,scale", [(50, 1.0), (3000, 0.3), (3000, 4.0)])
def test_candidates_equal_the_reference_filter(vocab, scale):
    """The fast path (top-k first, top-p tried on the largest 1024 then a full sort) samples from exactly the
    distribution of softmax(filter_logits(logits / T)); vocab 3000 exercises both the 1024-candidate path and its
    fallback."""
    logits = torch.randn(5, vocab, generator=torch.Generator().manual_seed(vocab)) * scale
    for top_k, top_p, min_p in itertools.product([-1, 1, 7, 100], [1.0, 0.9, 0.3], [0.0, 0.05, 0.5]):
        want = torch.softmax(filter_logits(logits / 0.7, top_k, top_p, min_p), -1)
        probs, ids = candidates(logits, 0.7, top_k, top_p, min_p)
        got = probs if ids is None else torch.zeros_like(want).scatter_(1, ids, probs)
        got = got / got.sum(-1, keepdim=True)
        err = (got - want).abs().max().item()
        assert err < 1e-5, f"top_k={top_k} top_p={top_p} min_p={min_p}: max difference {err:.2e}"


def test_draw_follows_the_probabilities():
    probs = torch.tensor([[0.1, 0.0, 0.6, 0.3, 0.0]]).repeat(100_000, 1)
    freq = torch.bincount(draw(probs, torch.Generator().manual_seed(0)), minlength=5) / 100_000
    torch.testing.assert_close(freq, probs[0], atol=0.01, rtol=0)
    assert freq[1] == 0 and freq[4] == 0


def test_repetition_penalty_pushes_seen_tokens_down():
    logits = torch.tensor([[2.0, 1.9, -1.0, -1.1]])
    seen = torch.tensor([[True, False, True, False]])
    assert sample(logits, SamplingParams(temperature=0), seen=seen).tokens.item() == 0
    assert sample(logits, SamplingParams(temperature=0, repetition_penalty=1.2), seen=seen).tokens.item() == 1


# ---- sampling runs --------------------------------------------------------------------------------------------------
def _sampled(model, tokenizer, **kwargs):
    params = SamplingParams(**{"max_tokens": 6, **kwargs})
    outs = generate_ids(model, _ids(tokenizer)[:2], params, eos_token_ids=[tokenizer.eos_token_id],
                        pad_token_id=tokenizer.pad_token_id)
    return [[c.token_ids for c in per_prompt] for per_prompt in outs]


def test_seeded_runs_are_reproducible_and_n_gives_n_samples(plain_model, tokenizer):
    a = _sampled(plain_model, tokenizer, n=3, seed=11, top_p=0.9, min_p=0.01)
    assert a == _sampled(plain_model, tokenizer, n=3, seed=11, top_p=0.9, min_p=0.01)
    assert a != _sampled(plain_model, tokenizer, n=3, seed=12, top_p=0.9, min_p=0.01)
    assert [len(per_prompt) for per_prompt in a] == [3, 3]
    assert len({tuple(t) for t in a[0]}) > 1  # the samples of one prompt differ
    torch.manual_seed(5)
    b = _sampled(plain_model, tokenizer, n=2)
    torch.manual_seed(5)
    assert b == _sampled(plain_model, tokenizer, n=2)  # no seed: torch's global generator


def test_duplicate_prompts_each_get_their_completions(plain_model, tokenizer):
    one = _ids(tokenizer)[0]
    outs = generate_ids(plain_model, [one, one, one], SamplingParams(temperature=0, max_tokens=5),
                        eos_token_ids=[], pad_token_id=tokenizer.pad_token_id)
    assert len(outs) == 3 and outs[0][0].token_ids == outs[1][0].token_ids == outs[2][0].token_ids


# ---- stopping -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("compact_when_dead", [1, 10**9])
def test_max_tokens_gives_length_and_eos_gives_stop(plain_model, tokenizer, compact_when_dead, monkeypatch):
    """Finished rows leave the batch at once (1) or stay in it, ignored (never compacted): same completions."""
    import fasttune.rl.engine as engine

    monkeypatch.setattr(engine, "COMPACT_WHEN_DEAD", compact_when_dead)
    prompts = _ids(tokenizer)
    free = _greedy(plain_model, prompts, tokenizer, max_tokens=8, ignore_eos=True)
    assert all(c.finish_reason == "length" and len(c.token_ids) == 8 and c.stop_reason is None for c in free)
    eos = free[0].token_ids[2]  # make row 0's third greedy token the eos
    outs = generate_ids(plain_model, prompts, SamplingParams(temperature=0, max_tokens=8), eos_token_ids=[eos],
                        pad_token_id=tokenizer.pad_token_id)
    for c_free, (c,) in zip(free, outs):
        end = c_free.token_ids.index(eos) + 1 if eos in c_free.token_ids else 8
        assert c.token_ids == c_free.token_ids[:end]  # rows that ended were dropped; the others are unchanged
        assert c.finish_reason == ("stop" if eos in c_free.token_ids else "length") and c.stop_reason is None


def test_min_tokens_holds_eos_back(plain_model, tokenizer):
    prompts = _ids(tokenizer)[:1]
    free = _greedy(plain_model, prompts, tokenizer, max_tokens=8, ignore_eos=True)[0].token_ids
    eos = free[1]
    short = generate_ids(plain_model, prompts, SamplingParams(temperature=0, max_tokens=8), eos_token_ids=[eos],
                         pad_token_id=tokenizer.pad_token_id)[0][0]
    assert short.token_ids == free[:2] and short.finish_reason == "stop"
    held = generate_ids(plain_model, prompts, SamplingParams(temperature=0, max_tokens=8, min_tokens=5),
                        eos_token_ids=[eos], pad_token_id=tokenizer.pad_token_id)[0][0]
    assert eos not in held.token_ids[:5] and len(held.token_ids) >= 5


def test_stop_token_ids_end_and_are_left_out_of_the_text(plain_model, tokenizer):
    prompts = _ids(tokenizer)[:1]
    free = _greedy(plain_model, prompts, tokenizer, max_tokens=8, ignore_eos=True)[0]
    stop = free.token_ids[3]
    first = free.token_ids.index(stop)
    c = _greedy(plain_model, prompts, tokenizer, max_tokens=8, stop_token_ids=[stop])[0]
    assert c.token_ids == free.token_ids[:first + 1]
    assert c.finish_reason == "stop" and c.stop_reason == stop
    assert c.text == tokenizer.decode(free.token_ids[:first], skip_special_tokens=True)


def test_stop_strings_end_and_are_trimmed(plain_model, tokenizer):
    prompts = [tokenizer("The capital of France is")["input_ids"]]
    free = _greedy(plain_model, prompts, tokenizer, max_tokens=12, ignore_eos=True)[0]
    text = tokenizer.decode(free.token_ids, skip_special_tokens=True)
    # a random model: pick a plain-text piece to stop on
    pieces = [tokenizer.decode([t], skip_special_tokens=True) for t in free.token_ids]
    stop = next(p for p in pieces[3:] if p.strip() and p.isascii() and p.isprintable())
    assert stop in text
    cut = text.find(stop)
    c = _greedy(plain_model, prompts, tokenizer, max_tokens=12, stop=stop)[0]
    assert c.finish_reason == "stop" and c.stop_reason == stop
    assert c.text == text[:cut] and len(c.token_ids) < 12
    kept = _greedy(plain_model, prompts, tokenizer, max_tokens=12, stop=[stop], include_stop_str_in_output=True)[0]
    assert kept.text == text[:cut + len(stop)]


def test_a_special_token_stop_string_ends_by_id(plain_model, tokenizer):
    """Unsloth's notebooks pass stop=[tokenizer.eos_token]: special tokens never show in text decoded with
    skip_special_tokens, so such a stop string ends a row by its id."""
    prompts = [tokenizer("The capital of France is")["input_ids"]]
    free = _greedy(plain_model, prompts, tokenizer, max_tokens=12, ignore_eos=True)[0]
    markers = {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}  # <|python_tag|>, [INST], ...
    special = [t for t in free.token_ids if t in markers]
    assert special  # the tiny random model emits special tokens here
    stop = tokenizer.convert_ids_to_tokens(special[0])
    c = _greedy(plain_model, prompts, tokenizer, max_tokens=12, stop=[stop])[0]
    assert c.token_ids == free.token_ids[:free.token_ids.index(special[0]) + 1]
    assert c.finish_reason == "stop" and c.stop_reason == stop


def test_stop_strings_need_the_tokenizer(plain_model):
    with pytest.raises(ValueError, match="stop: .* needs the tokenizer"):
        generate_ids(plain_model, [[1, 2]], SamplingParams(stop="x"), eos_token_ids=[], pad_token_id=0)


# ---- errors ---------------------------------------------------------------------------------------------------------
def test_prompt_too_long_names_the_prompt_and_the_real_remedies(plain_model):
    with pytest.raises(ValueError, match=r"prompts\[1\]: 30 prompt tokens \+ max_tokens 16 = 46, more than the length "
                                         r"limit 40 \(the model's max_seq_length, set by from_pretrained\); shorten the "
                                         r"prompt, lower SamplingParams\(max_tokens=...\) to at most 10"):
        generate_ids(plain_model, [[5] * 10, [5] * 30], SamplingParams(), eos_token_ids=[], pad_token_id=0,
                     max_length=40)
    # max_tokens alone past the limit: that is what is wrong, not the (short) prompt
    with pytest.raises(ValueError, match=r"max_tokens: 100 new tokens do not fit the length limit 40 .* with any "
                                         r"prompt; lower SamplingParams\(max_tokens=...\) below 40"):
        generate_ids(plain_model, [[5] * 3], SamplingParams(max_tokens=100), eos_token_ids=[], pad_token_id=0,
                     max_length=40)
    with pytest.raises(ValueError, match=r"prompts: the list is empty; give at least one prompt"):
        generate_ids(plain_model, [], SamplingParams(), eos_token_ids=[], pad_token_id=0)


def test_max_tokens_none_fills_up_to_max_length(plain_model):
    outs = generate_ids(plain_model, [[5] * 10, [5] * 13], SamplingParams(temperature=0, max_tokens=None),
                        eos_token_ids=[], pad_token_id=0, max_length=16)
    assert [len(c.token_ids) for (c,) in outs] == [6, 3] and all(c.finish_reason == "length" for (c,) in outs)
    with pytest.raises(ValueError, match="max_tokens: None .* needs generate's max_length"):
        generate_ids(plain_model, [[5]], SamplingParams(max_tokens=None), eos_token_ids=[], pad_token_id=0)
    with pytest.raises(ValueError, match="pad_token_id: None must be a token id"):
        generate_ids(plain_model, [[5]], SamplingParams(), eos_token_ids=[], pad_token_id=None)
    with pytest.raises(ValueError, match=r"prompt_ids\[1\]: expected a non-empty list of token ids"):
        generate_ids(plain_model, [[5], []], SamplingParams(), eos_token_ids=[], pad_token_id=0)


@pytest.mark.parametrize("kwargs,message", [
    (dict(top_p=1.5), r"top_p: 1.5 is outside \(0, 1\]"),
    (dict(top_p=0.0), r"top_p: 0.0 is outside \(0, 1\]"),
    (dict(n=0), "n: 0 must be an integer >= 1"),
    (dict(temperature=-1), "temperature: -1 must be a number >= 0"),
    (dict(temperature=float("nan")), "temperature: nan must be a number >= 0"),
    (dict(seed=1.5), "seed: 1.5 must be None or an integer"),
    (dict(top_k=-5), "top_k: -5 must be an integer >= 1, or 0 / -1"),
    (dict(min_p=2.0), r"min_p: 2.0 is outside \[0, 1\]"),
    (dict(max_tokens=0), "max_tokens: 0 must be an integer >= 1"),
    (dict(min_tokens=20, max_tokens=10), r"min_tokens: 20 is larger than max_tokens \(10\)"),
    (dict(repetition_penalty=0), "repetition_penalty: 0 must be a number > 0"),
    (dict(logprobs=-1), "logprobs: -1 must be None or an integer >= 0"),
    (dict(stop=[""]), "stop: .* must be non-empty strings"),
])
def test_bad_sampling_params_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_bad_sampling_params_are_all_reported_and_unknown_options_are_type_errors():
    with pytest.raises(ConfigError, match=r"SamplingParams: 2 invalid option\(s\):\n  - top_p: 2.0 .*\n  - min_p: -1.0"):
        SamplingParams(top_p=2.0, min_p=-1.0)
    with pytest.raises(TypeError):
        SamplingParams(best_of_everything=3)


# ---- the vLLM-shaped API --------------------------------------------------------------------------------------------
def test_generate_returns_vllm_shaped_outputs(plain_model, tokenizer):
    bos = tokenizer.bos_token
    outs = generate(plain_model, tokenizer, ["Hello", bos + "Hello"], SamplingParams(n=2, max_tokens=4, seed=0,
                                                                                   logprobs=2))
    assert all(isinstance(o, RequestOutput) for o in outs) and [o.request_id for o in outs] == ["0", "1"]
    assert outs[0].prompt_token_ids == outs[1].prompt_token_ids == tokenizer("Hello")["input_ids"]  # one bos
    first = outs[0].outputs[0]
    assert isinstance(first.text, str) and len(first.token_ids) == 4 and first.index == 0
    assert first.text == tokenizer.decode(first.token_ids, skip_special_tokens=True)
    assert len(first.logprobs) == 4 and first.logprobs[0][first.token_ids[0]].rank >= 1
    assert all(len(pos) >= 2 for pos in first.logprobs)  # the sampled token and the top 2
    assert first.cumulative_logprob == pytest.approx(sum(p[t].logprob for p, t in zip(first.logprobs,
                                                                                        first.token_ids)))
    single = generate(plain_model, tokenizer, "Hello", SamplingParams(temperature=0, max_tokens=3))
    assert len(single) == 1 and single[0].outputs[0].logprobs is None and single[0].outputs[0].cumulative_logprob is None
    by_ids = generate(plain_model, tokenizer, [tokenizer("Hello")["input_ids"]],
                      SamplingParams(temperature=0, max_tokens=3))
    assert by_ids[0].outputs[0].token_ids == single[0].outputs[0].token_ids and by_ids[0].prompt is None
