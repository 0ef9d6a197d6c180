"""Gemma 3 (text): Gemma 2 layout with q/k norms instead of attention softcapping, 5:1 local/global layers.

The multimodal ``gemma3`` model wraps a ``gemma3_text`` tower; both are this family.
"""

from .gguf import ATTN, GLOBAL, MLP, QK_NORM, SANDWICH_NORMS, TensorMap
from .spec import FamilySpec, SpecialTokens, TinySpec

SPEC = FamilySpec(
    family="gemma3",
    model_type="gemma3_text",
    wrapper_model_types=("gemma3",),
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
