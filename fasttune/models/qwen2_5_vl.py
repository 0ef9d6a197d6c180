"""Qwen2.5-VL: Qwen2-VL's layout with an RMS-normed, gated-SiLU vision tower and window attention.

The language tower is Qwen2-VL's (llama.cpp runs it as ``qwen2vl`` too); the mmproj file is llama.cpp's
``qwen2.5vl_merger``: RMS norms (no biases), a gated SiLU MLP, window attention in all but every n-th block.
"""

from dataclasses import replace

from .mmproj import MMProjMap, Split
from .qwen2_vl import SPEC as QWEN2_VL
from .qwen2_vl import TINY as QWEN2_VL_TINY
from .qwen2_vl import TOWER as QWEN2_VL_TOWER
from .qwen2_vl import VISION as QWEN2_VL_VISION
from .spec import FamilySpec, VisionSpec

SPEC = FamilySpec(
    family="qwen2_5_vl",
    model_type="qwen2_5_vl_text",
    name="Qwen2.5-VL",
    gguf=QWEN2_VL.gguf,
    text_equivalent=QWEN2_VL.text_equivalent,
)

TOWER: dict[str, str | Split] = {
    **{k: v for k, v in QWEN2_VL_TOWER.items() if "norm" not in k and "mlp.fc" not in k and "ln_q.bias" not in k},
    **{f"blocks.{{}}.{hf}.weight": f"v.blk.{{}}.{ours}.weight" for hf, ours in (("norm1", "ln1"), ("norm2", "ln2"))},
    **{f"blocks.{{}}.mlp.{hf}_proj.{kind}": f"v.blk.{{}}.ffn_{hf}.{kind}"
       for hf in ("gate", "up", "down") for kind in ("weight", "bias")},
}

VISION = VisionSpec(
    family="qwen2_5_vl",
    model_type="qwen2_5_vl",
    name="Qwen2.5-VL",
    language=SPEC,
    packing="mrope",
    tower_attention="Qwen2_5_VLVisionAttention",
    mmproj=replace(  # Qwen2-VL's, with the sizes under the usual names and windows
        QWEN2_VL_VISION.mmproj,
        projector_type="qwen2.5vl_merger",
        names=TOWER,
        activation="silu",
        width=MMProjMap.width,
        feed_forward=MMProjMap.feed_forward,
        window_attention=True,
    ),
    tiny=replace(
        QWEN2_VL_TINY,
        processor="Qwen2_5_VLProcessor",
        # window attention works on 112-pixel windows (the released value, which llama.cpp assumes), so images may
        # be twice as wide and tall: up to 4 windows
        image_processor=(QWEN2_VL_TINY.image_processor[0], dict(min_pixels=56 * 56, max_pixels=224 * 224)),
        vision=dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=4, out_hidden_size=128, patch_size=14,
                    spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[1]),
        vision_width="out_hidden_size",
    ),
)
