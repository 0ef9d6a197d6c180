"""Qwen2-VL and Qwen2.5-VL language towers: the Qwen2 layout (q/k/v biases, SwiGLU) with multimodal RoPE.

The fast path patches the language tower's norms, attention projections and MLPs exactly as for Qwen2 (RoPE, here
3-D "mrope", stays transformers' own). The vision tower is not patched. GGUF: llama.cpp's ``qwen2vl`` architecture
(Qwen2's tensors plus the rope sections) for the language model; the vision part goes to an mmproj file. On text
alone mrope's three position streams are equal, so the tower computes what Qwen2 computes (``text_equivalent``).
"""

from .gguf import ATTN, ATTN_BIAS, GLOBAL, MLP, PRE_NORMS, TensorMap
from .spec import FamilySpec

SPEC = FamilySpec(
    family="qwen2_vl",
    model_type="qwen2_vl_text",
    wrapper_model_types=("qwen2_vl",),
    name="Qwen2-VL",
    gguf=TensorMap("qwen2vl", {**GLOBAL, **ATTN, **ATTN_BIAS, **MLP, **PRE_NORMS}, rope_sections=True),
    text_equivalent="qwen2",
)

SPEC_2_5 = FamilySpec(  # llama.cpp runs the Qwen2.5-VL language model as qwen2vl too
    family="qwen2_5_vl",
    model_type="qwen2_5_vl_text",
    wrapper_model_types=("qwen2_5_vl",),
    name="Qwen2.5-VL",
    gguf=SPEC.gguf,
    text_equivalent="qwen2",
)
