"""Llama (1/2/3.x): RMSNorm x*w, SwiGLU, rotate-half RoPE (llama.cpp's "llama" arch wants q/k rows permuted)."""

from .gguf import ATTN, GLOBAL, MLP, PRE_NORMS, TensorMap
from .spec import FamilySpec, SpecialTokens, TinySpec

SPEC = FamilySpec(
    family="llama",
    model_type="llama",
    name="Llama",
    gguf=TensorMap("llama", {**GLOBAL, **ATTN, **MLP, **PRE_NORMS}, permute_qk=True),
    tiny=TinySpec(
        tokens=SpecialTokens("<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>"),
        config=dict(tie_word_embeddings=False),
    ),
)
