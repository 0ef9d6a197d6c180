"""Qwen2-VL and Qwen2.5-VL language towers: the Qwen2 layout (q/k/v biases, SwiGLU) with multimodal RoPE.

The fast path patches the language tower's norms, attention projections and MLPs exactly as for Qwen2 (RoPE, here
3-D "mrope", stays transformers' own). The vision tower is not patched. No GGUF map yet: llama.cpp's ``qwen2vl``
architecture needs the rope sections and an mmproj file, which fasttune does not write.
"""

from .spec import FamilySpec

SPEC = FamilySpec(
    family="qwen2_vl",
    model_type="qwen2_vl_text",
    wrapper_model_types=("qwen2_vl",),
    name="Qwen2-VL",
)

SPEC_2_5 = FamilySpec(
    family="qwen2_5_vl",
    model_type="qwen2_5_vl_text",
    wrapper_model_types=("qwen2_5_vl",),
    name="Qwen2.5-VL",
)
