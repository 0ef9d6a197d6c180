"""Gemma: RMSNorm x*(1+w), GeGLU (tanh), embeddings scaled by sqrt(hidden) (llama.cpp's gemma arch does that itself).

llama.cpp's gemma arch always uses the input embeddings as the output head (``output_optional=False``).
"""

from .gguf import ATTN, GLOBAL, MLP, PRE_NORMS, TensorMap
from .spec import FamilySpec, SpecialTokens, TinySpec

SPEC = FamilySpec(
    family="gemma",
    model_type="gemma",
    name="Gemma",
    norm="rms_offset",
    activation="gelu_tanh",
    gguf=TensorMap("gemma", {**GLOBAL, **ATTN, **MLP, **PRE_NORMS}, norm_offset=1.0, output_optional=False),
    tiny=TinySpec(
        tokens=SpecialTokens("<bos>", "<eos>", "<pad>", unk="<unk>"),
        config=dict(tie_word_embeddings=True, hidden_activation="gelu_pytorch_tanh"),
    ),
)
