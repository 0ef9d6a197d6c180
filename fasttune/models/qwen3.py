"""Qwen3: llama layout with per-head RMSNorm on q and k, NeoX-style RoPE."""

from .gguf import ATTN, GLOBAL, MLP, PRE_NORMS, QK_NORM, TensorMap
from .spec import FamilySpec, SpecialTokens, TinySpec

SPEC = FamilySpec(
    family="qwen3",
    model_type="qwen3",
    name="Qwen3",
    gguf=TensorMap("qwen3", {**GLOBAL, **ATTN, **QK_NORM, **MLP, **PRE_NORMS}),
    tiny=TinySpec(
        tokens=SpecialTokens(None, "<|endoftext|>", "<|endoftext|>", add_bos=False),
        config=dict(tie_word_embeddings=True),
    ),
)
