"""gpt-oss (20b, 120b): attention with a learned per-head sink logit and q/k/v/o biases, sliding-window layers
alternating with full ones (``layer_types``), YaRN RoPE; every decoder MLP a mixture of experts whose router has a
bias and takes the top-k *logits* then a softmax over those k; experts with biases, stored transposed
``gate_up_proj`` ``(E, H, 2I)`` with gate and up interleaved along ``2I``, ``down_proj`` ``(E, I, H)``, and a clamped
gated activation: ``(clamp(up, -l, l) + 1) * g * sigmoid(alpha * g)``, ``g = clamp(gate, max=l)`` (alpha 1.702,
l 7). Released checkpoints store the experts in MXFP4; transformers dequantizes them to bf16 where no MXFP4 kernel
runs (``Mxfp4Config(dequantize=True)``, what fasttune asks for on CPU)."""

from .gguf import ATTN, ATTN_BIAS, GLOBAL, TensorMap, experts
from .spec import FamilySpec, MoESpec, SpecialTokens, TinySpec

MOE = MoESpec(router="router", transposed=True, interleaved=True, bias=True, activation="clamped_swiglu",
              returns_scores=True)

SPEC = FamilySpec(
    family="gpt_oss",
    model_type="gpt_oss",
    name="gpt-oss",
    moe=MOE,
    packed_masks=True,
    # llama.cpp's gpt-oss arch: sinks, the post-attention norm under its own name, biased router and experts; its
    # activation's clamp is fixed at 7 (and alpha at 1.702, as transformers'); sliding layers alternate
    gguf=TensorMap(
        "gpt-oss",
        {
            **GLOBAL, **ATTN, **ATTN_BIAS,
            "model.layers.{}.self_attn.o_proj.bias": "blk.{}.attn_output.bias",
            "model.layers.{}.self_attn.sinks": "blk.{}.attn_sinks.weight",
            "model.layers.{}.input_layernorm.weight": "blk.{}.attn_norm.weight",
            "model.layers.{}.post_attention_layernorm.weight": "blk.{}.post_attention_norm.weight",
            **experts(MOE),
        },
        sliding_window="per_layer", moe=True, expert_width="intermediate_size", fixed={"swiglu_limit": 7.0},
    ),
    tiny=TinySpec(
        tokens=SpecialTokens("<|startoftext|>", "<|return|>", "<|endoftext|>", add_bos=False),
        # the real routing (32 experts, top-4) scaled down; sinks, alternating windows and YaRN as released
        config=dict(tie_word_embeddings=False, num_local_experts=8, num_experts_per_tok=4, intermediate_size=176,
                    sliding_window=32, attention_bias=True, max_position_embeddings=131072),
    ),
)
