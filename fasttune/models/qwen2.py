"""Qwen2 / Qwen2.5: llama layout with q/k/v biases, optional sliding window, NeoX-style RoPE."""

from .gguf import ATTN, ATTN_BIAS, GLOBAL, MLP, PRE_NORMS, TensorMap
from .spec import FamilySpec, SpecialTokens, TinySpec

SPEC = FamilySpec(
    family="qwen2",
    model_type="qwen2",
    name="Qwen2",
    gguf=TensorMap("qwen2", {**GLOBAL, **ATTN, **ATTN_BIAS, **MLP, **PRE_NORMS}),
    tiny=TinySpec(
        tokens=SpecialTokens(None, "<|endoftext|>", "<|endoftext|>", add_bos=False),
        config=dict(tie_word_embeddings=True),
    ),
)
