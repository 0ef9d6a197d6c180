"""Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B): Qwen3's attention (per-head q/k RMSNorm, NeoX RoPE); every decoder MLP a
mixture of experts (``decoder_sparse_step`` 1, no ``mlp_only_layers`` in the released models): a softmax router over
the experts, top-k, renormalised over the chosen k (``norm_topk_prob``), SwiGLU experts stored as transformers' 3-D
``gate_up_proj`` ``(E, 2I, H)`` (gate half, then up half) and ``down_proj`` ``(E, H, I)``, no biases."""

from . import qwen3
from .gguf import ATTN, GLOBAL, PRE_NORMS, QK_NORM, TensorMap, experts
from .spec import FamilySpec, MoESpec, TinySpec

MOE = MoESpec(router="gate")

SPEC = FamilySpec(
    family="qwen3_moe",
    model_type="qwen3_moe",
    name="Qwen3-MoE",
    moe=MOE,
    # llama.cpp's qwen3moe: every layer sparse, the top-k weights always renormalised (convert_hf_to_gguf.py's
    # Qwen3MoeModel; expert width from moe_intermediate_size)
    gguf=TensorMap("qwen3moe", {**GLOBAL, **ATTN, **QK_NORM, **PRE_NORMS, **experts(MOE)}, moe=True,
                   expert_width="moe_intermediate_size",
                   fixed={"norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": []}),
    tiny=TinySpec(
        tokens=qwen3.SPEC.tiny.tokens,
        # the real models' routing (128 experts, top-8) scaled down; the expert width is not a multiple of 32
        config=dict(tie_word_embeddings=False, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=176,
                    norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[]),
    ),
)
