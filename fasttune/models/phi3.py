"""Phi-3 / Phi-3.5 / Phi-4 mini: llama maths with fused qkv_proj and gate_up_proj."""

from .gguf import GLOBAL, PRE_NORMS, TensorMap
from .spec import FamilySpec, SpecialTokens, TinySpec

_FUSED = {
    "model.layers.{}.self_attn.qkv_proj.weight": "blk.{}.attn_qkv.weight",
    "model.layers.{}.self_attn.o_proj.weight": "blk.{}.attn_output.weight",
    "model.layers.{}.mlp.gate_up_proj.weight": "blk.{}.ffn_up.weight",  # llama.cpp splits gate|up itself
    "model.layers.{}.mlp.down_proj.weight": "blk.{}.ffn_down.weight",
}

SPEC = FamilySpec(
    family="phi3",
    model_type="phi3",
    name="Phi3",
    attention=("qkv_proj", "o_proj"),
    mlp=("gate_up_proj", "down_proj"),
    fused_aliases={"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj",
                   "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj"},
    gguf=TensorMap(
        "phi3", {**GLOBAL, **_FUSED, **PRE_NORMS}, sliding_window="all_layers", rope_orig_ctx=True
    ),
    tiny=TinySpec(
        tokens=SpecialTokens("<s>", "<|endoftext|>", "<|endoftext|>", unk="<unk>", add_bos=False),
        config=dict(tie_word_embeddings=False, pad_token_id=None),
        drop=("head_dim",),  # phi3 derives head_dim from hidden / heads
    ),
)
