"""Gemma 3 (text): Gemma 2 layout with q/k norms instead of attention softcapping, 5:1 local/global layers.

The multimodal ``gemma3`` model (``VISION``) wraps a ``gemma3_text`` tower: a SigLIP encoder, then an average-pool +
RMS-norm + linear projector (llama.cpp's ``gemma3`` projector). Its image tokens attend bidirectionally, so its rows
are not packed.
"""

from . import tiny_templates
from .gguf import ATTN, GLOBAL, MLP, QK_NORM, SANDWICH_NORMS, TensorMap
from .mmproj import SIGLIP_ENCODER, MMProjMap
from .spec import FamilySpec, SpecialTokens, TinySpec, TinyVisionSpec, VisionSpec

SPEC = FamilySpec(
    family="gemma3",
    model_type="gemma3_text",
    name="Gemma3",
    norm="rms_offset",
    activation="gelu_tanh",
    gguf=TensorMap(
        "gemma3",
        {**GLOBAL, **ATTN, **QK_NORM, **MLP, **SANDWICH_NORMS},
        norm_offset=1.0,
        softcapping="final",
        sliding_window="per_layer",
        rope_base_swa=True,
    ),
    tiny=TinySpec(
        tokens=SpecialTokens("<bos>", "<eos>", "<pad>", unk="<unk>"),
        config=dict(
            tie_word_embeddings=True,
            hidden_activation="gelu_pytorch_tanh",
            query_pre_attn_scalar=64,
            sliding_window=64,
            sliding_window_pattern=2,
        ),
    ),
)

TOKENS_PER_IMAGE = 16  # the tiny VLM's image tokens after pooling

VISION = VisionSpec(
    family="gemma3",
    model_type="gemma3",
    name="Gemma3 (vision)",
    language=SPEC,
    mmproj=MMProjMap(
        projector_type="gemma3",
        tower_prefix="model.vision_tower.",
        names=SIGLIP_ENCODER,
        projector_prefix="model.multi_modal_projector.",
        projector_names={"mm_input_projection_weight": "mm.input_projection.weight",
                         "mm_soft_emb_norm.weight": "mm.soft_emb_norm.weight"},
        offset_norms=("mm.soft_emb_norm.weight",),
        pooled_tokens=True,
    ),
    tiny=TinyVisionSpec(
        tokenizer=SPEC,
        image_markers=("<start_of_image>", "<end_of_image>", "<image_soft_token>"),
        template=tiny_templates.GEMMA,
        image_marker="<start_of_image>",
        processor="Gemma3Processor",
        image_processor=("transformers.models.gemma3.image_processing_pil_gemma3:Gemma3ImageProcessorPil",
                         dict(size={"height": 64, "width": 64})),
        text=dict(query_pre_attn_scalar=32, sliding_window=64, sliding_window_pattern=2,
                  hidden_activation="gelu_pytorch_tanh"),
        vision=dict(model_type="siglip_vision_model", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, image_size=64, patch_size=8, vision_use_head=False),
        config=dict(mm_tokens_per_image=TOKENS_PER_IMAGE),
        token_ids=dict(boi_token_index="<start_of_image>", eoi_token_index="<end_of_image>",
                       image_token_index="<image_soft_token>"),
        tokenizer_names=dict(boi_token="<start_of_image>", eoi_token="<end_of_image>",
                             image_token="<image_soft_token>"),
        processor_kwargs=dict(image_seq_length=TOKENS_PER_IMAGE),
        end_of_turn="<end_of_turn>",
    ),
)
