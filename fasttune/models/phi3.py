"""Phi-3 / Phi-3.5 / Phi-4 mini: llama maths with fused qkv_proj and gate_up_proj."""

from .spec import FamilySpec

SPEC = FamilySpec(
    model_type="phi3",
    name="Phi3",
    attention=("qkv_proj", "o_proj"),
    mlp=("gate_up_proj", "down_proj"),
    fused_aliases={"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj",
                   "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj"},
    sliding_window=True,
)
