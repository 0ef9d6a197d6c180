"""Llama 3.2 Vision (mllama): a tiled vision encoder feeding gated cross-attention layers between Llama decoder layers.

The fast path patches the language tower's self-attention layers' norms, projections and MLPs (the Llama layout); the
cross-attention layers (``cross_attn``, with their own gates) keep transformers' forward. No GGUF export: llama.cpp has
no mllama architecture. Rows are not packed (cross-attention masks are per row).
"""

from . import tiny_templates
from .llama import SPEC as LLAMA
from .spec import FamilySpec, TinyVisionSpec, VisionSpec

SPEC = FamilySpec(
    family="mllama",
    model_type="mllama_text_model",
    name="Llama-3.2-Vision",
)

VISION = VisionSpec(
    family="mllama",
    model_type="mllama",
    name="Llama-3.2-Vision",
    language=SPEC,
    tiny=TinyVisionSpec(
        tokenizer=LLAMA,
        image_markers=("<|image|>",),
        template=tiny_templates.LLAMA3,
        image_marker="<|image|>",
        processor="MllamaProcessor",
        image_processor=("transformers.models.mllama.image_processing_pil_mllama:MllamaImageProcessorPil",
                         dict(size={"height": 28, "width": 28}, max_image_tiles=4)),
        text=dict(cross_attention_layers=[1]),
        vision=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_global_layers=1,
                    attention_heads=4, image_size=28, patch_size=14, max_num_tiles=4,
                    intermediate_layers_indices=[0, 1], vision_output_dim=192),
        token_ids=dict(image_token_index="<|image|>"),
        end_of_turn="<|eot_id|>",
    ),
)
