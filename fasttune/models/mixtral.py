"""Mixtral (8x7B, 8x22B): Mistral's attention (rotate-half RoPE, llama.cpp's "llama" arch with q/k rows permuted);
every decoder MLP 8 SwiGLU experts, a softmax router and top-2 renormalised over the two, experts stored as
transformers' 3-D ``gate_up_proj`` ``(E, 2I, H)`` (gate half, then up half) and ``down_proj`` ``(E, H, I)``."""

from . import mistral
from .gguf import ATTN, GLOBAL, PRE_NORMS, TensorMap, experts
from .spec import FamilySpec, MoESpec, TinySpec

MOE = MoESpec(router="gate")

SPEC = FamilySpec(
    family="mixtral",
    model_type="mixtral",
    name="Mixtral",
    moe=MOE,
    # llama.cpp runs Mixtral as its "llama" arch with ffn_*_exps (the experts' width is feed_forward_length)
    gguf=TensorMap("llama", {**GLOBAL, **ATTN, **PRE_NORMS, **experts(MOE)}, permute_qk=True, moe=True),
    tiny=TinySpec(
        tokens=mistral.SPEC.tiny.tokens,
        config=dict(tie_word_embeddings=False, sliding_window=None, num_local_experts=8, num_experts_per_tok=2,
                    intermediate_size=176, router_jitter_noise=0.0),
    ),
)
