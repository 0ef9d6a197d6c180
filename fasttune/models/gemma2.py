"""Gemma 2: Gemma plus sandwich norms, attention / final-logit softcapping and alternating sliding-window layers."""

from .gguf import ATTN, GLOBAL, MLP, SANDWICH_NORMS, TensorMap
from .spec import FamilySpec, SpecialTokens, TinySpec

SPEC = FamilySpec(
    family="gemma2",
    model_type="gemma2",
    name="Gemma2",
    norm="rms_offset",
    activation="gelu_tanh",
    gguf=TensorMap(
        "gemma2",
        {**GLOBAL, **ATTN, **MLP, **SANDWICH_NORMS},
        norm_offset=1.0,
        output_optional=False,
        softcapping="attn_and_final",
        sliding_window="per_layer",
    ),
    tiny=TinySpec(
        tokens=SpecialTokens("<bos>", "<eos>", "<pad>", unk="<unk>"),
        config=dict(
            tie_word_embeddings=True,
            hidden_activation="gelu_pytorch_tanh",
            query_pre_attn_scalar=64,
            sliding_window=64,
            attn_logit_softcapping=50.0,
            final_logit_softcapping=30.0,
        ),
    ),
)
