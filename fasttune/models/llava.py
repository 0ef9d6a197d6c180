"""LLaVA: a CLIP vision tower and an MLP projector in front of a Llama language tower.

The language tower is the llama family (its fast path); image tokens attend causally like text, so rows are packed
with plain positions. No GGUF export yet (no mmproj map).
"""

from . import tiny_templates
from .llama import SPEC as LLAMA
from .spec import TinyVisionSpec, VisionSpec

VISION = VisionSpec(
    family="llava",
    model_type="llava",
    name="LLaVA",
    language=LLAMA,
    packing="1d",
    tiny=TinyVisionSpec(
        tokenizer=LLAMA,
        image_markers=("<image>",),
        template=tiny_templates.USER_ASSISTANT,
        image_marker="<image>\n",
        processor="LlavaProcessor",
        image_processor=("transformers.models.llava.image_processing_pil_llava:LlavaImageProcessorPil",
                         dict(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56})),
        text=dict(model_type=LLAMA.model_type),
        vision=dict(model_type="clip_vision_model", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, image_size=56, patch_size=14, projection_dim=64),
        config=dict(vision_feature_layer=-1, vision_feature_select_strategy="default", projector_hidden_act="gelu"),
        token_ids=dict(image_token_index="<image>"),
        processor_kwargs=dict(patch_size=14, vision_feature_select_strategy="default", num_additional_image_tokens=1),
    ),
)
