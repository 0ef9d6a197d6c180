"""Mistral: llama layout (written as llama.cpp's "llama" arch), optional sliding-window attention."""

from .gguf import ATTN, GLOBAL, MLP, PRE_NORMS, TensorMap
from .spec import FamilySpec, SpecialTokens, TinySpec

SPEC = FamilySpec(
    family="mistral",
    model_type="mistral",
    name="Mistral",
    gguf=TensorMap("llama", {**GLOBAL, **ATTN, **MLP, **PRE_NORMS}, permute_qk=True),
    tiny=TinySpec(
        tokens=SpecialTokens("<s>", "</s>", "<pad>", unk="<unk>"),
        config=dict(tie_word_embeddings=False, sliding_window=None),
    ),
)
