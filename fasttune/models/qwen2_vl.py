"""Qwen2-VL: a ViT (2-D RoPE, quick-GELU, 2x2 patch merger) in front of a Qwen2 language tower with multimodal RoPE.

The fast path patches the language tower's norms, attention projections and MLPs exactly as for Qwen2 (RoPE, here
3-D "mrope", stays transformers' own). The vision tower (``tower_attention``) keeps its norms and MLP, its linears
run the fused LoRA projection and its per-image attention :mod:`fasttune.kernels.segment_attention` (see
:mod:`fasttune.patch.vision_tower`). GGUF: llama.cpp's ``qwen2vl`` architecture
(Qwen2's tensors plus the rope sections) for the language model; the vision part goes to an mmproj file
(``qwen2vl_merger``: the fused ``qkv`` is split into q/k/v and the two-frame patch kernel into two 2-D kernels, as
llama.cpp's graph wants). On text alone mrope's three position streams are equal, so the tower computes what Qwen2
computes (``text_equivalent``). Rows are packed with each conversation's own 3-D positions.
"""

from . import tiny_templates
from .gguf import ATTN, ATTN_BIAS, GLOBAL, MLP, PRE_NORMS, TensorMap
from .mmproj import MMProjMap, Split
from .qwen2 import SPEC as QWEN2
from .spec import FamilySpec, TinyVisionSpec, VisionSpec

SPEC = FamilySpec(
    family="qwen2_vl",
    model_type="qwen2_vl_text",
    name="Qwen2-VL",
    gguf=TensorMap("qwen2vl", {**GLOBAL, **ATTN, **ATTN_BIAS, **MLP, **PRE_NORMS}, rope_sections=True),
    text_equivalent=QWEN2.model_type,
)

# the vision tower's names (after ``model.visual.``) -> llama.cpp's ``v.*`` / ``mm.*`` names; {} is the layer index
TOWER: dict[str, str | Split] = {
    "patch_embed.proj.weight": Split(2, ("v.patch_embd.weight", "v.patch_embd.weight.1"), squeeze=True),
    "merger.ln_q.weight": "v.post_ln.weight",
    "merger.ln_q.bias": "v.post_ln.bias",
    "merger.mlp.0.weight": "mm.0.weight",
    "merger.mlp.0.bias": "mm.0.bias",
    "merger.mlp.2.weight": "mm.2.weight",
    "merger.mlp.2.bias": "mm.2.bias",
    **{f"blocks.{{}}.{hf}.{kind}": f"v.blk.{{}}.{ours}.{kind}"
       for hf, ours in (("norm1", "ln1"), ("norm2", "ln2"), ("attn.proj", "attn_out"), ("mlp.fc1", "ffn_up"),
                        ("mlp.fc2", "ffn_down"))
       for kind in ("weight", "bias")},
    **{f"blocks.{{}}.attn.qkv.{kind}": Split(0, tuple(f"v.blk.{{}}.attn_{x}.{kind}" for x in "qkv"))
       for kind in ("weight", "bias")},
}

# The tiny VLM of both Qwen VL families: ChatML, the vision markers, 3-D rope sections of a 32-wide head.
TINY = TinyVisionSpec(
    tokenizer=QWEN2,
    image_markers=("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"),
    template=tiny_templates.CHATML,
    image_marker="<|vision_start|><|image_pad|><|vision_end|>",
    processor="Qwen2VLProcessor",
    # 56x56 .. 112x112 pixels: 16 to 64 patches of 14, 4 to 16 tokens after the 2x2 merge
    image_processor=("transformers.models.qwen2_vl.image_processing_pil_qwen2_vl:Qwen2VLImageProcessorPil",
                     dict(min_pixels=56 * 56, max_pixels=112 * 112)),
    text=dict(tie_word_embeddings=True,
              rope_parameters={"rope_type": "default", "mrope_section": [4, 6, 6], "rope_theta": 10000.0}),
    vision=dict(depth=2, embed_dim=64, hidden_size=128, num_heads=4, mlp_ratio=2, patch_size=14, spatial_merge_size=2,
                temporal_patch_size=2),
    config=dict(tie_word_embeddings=True),
    token_ids=dict(image_token_id="<|image_pad|>", video_token_id="<|video_pad|>",
                   vision_start_token_id="<|vision_start|>", vision_end_token_id="<|vision_end|>"),
    vision_width="hidden_size",  # the merger's output width is the text width
    end_of_turn="<|im_end|>",
)

VISION = VisionSpec(
    family="qwen2_vl",
    model_type="qwen2_vl",
    name="Qwen2-VL",
    language=SPEC,
    packing="mrope",
    tower_attention="VisionAttention",
    mmproj=MMProjMap(  # Qwen's vision configs name their sizes their own way
        projector_type="qwen2vl_merger",
        tower_prefix="model.visual.",
        names=TOWER,
        keep_f32=(),
        activation="quick_gelu",
        width="embed_dim",
        feed_forward=("embed_dim", "mlp_ratio"),
        depth="depth",
        heads="num_heads",
        layer_norm_eps=1e-6,
        spatial_merge=True,
    ),
    tiny=TINY,
)
