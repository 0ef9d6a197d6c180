"""Offline byte-level BPE tokenizers with each family's special tokens.

Nothing here touches a model hub: the BPE is trained in well under a second on a small built-in corpus (plus any
text the caller adds), and every chat-template marker fasttune knows is registered as a single special token so that
templates tokenize the way the real models do.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from fasttune.models import SpecialTokens, families

# family -> its bos/eos/pad/unk convention, declared in each fasttune/models/<family>.py.
FAMILY_TOKENS: dict[str, SpecialTokens] = {spec.family: spec.tiny.tokens for spec in families() if spec.tiny is not None}

# Every marker used by the chat templates fasttune ships, so any template tokenizes atomically with any tiny tokenizer.
TEMPLATE_MARKERS: tuple[str, ...] = (
    "<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>", "<|start_header_id|>", "<|end_header_id|>",
    "<|eot_id|>", "<|eom_id|>", "<|python_tag|>",
    "<s>", "</s>", "<unk>", "<pad>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]",
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>",
    "<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>",
    "<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|im_sep|>",
    "<|start|>", "<|message|>", "<|channel|>", "<|return|>", "<|call|>", "<|constrain|>",
)

_BASE_CORPUS = """\
The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step.
You are a helpful assistant. What is the capital of France? The capital of France is Paris.
Below is an instruction that describes a task. Write a response that appropriately completes the request.
### Instruction: ### Input: ### Response: User: Assistant: System: Human: GPT:
def add(a, b):\n    return a + b\nfor i in range(10):\n    print(i * 2)
Numbers 0 1 2 3 4 5 6 7 8 9 10 42 100 2048 3.14 -7 and punctuation , . ; : ! ? ( ) [ ] { } " ' - + * / = < > |
Fine-tuning language models with low-rank adapters is fast and uses little memory.
"""


def build_tokenizer(
    family: str = "llama",
    extra_texts: list[str] | None = None,
    vocab_size: int = 1024,
    markers: tuple[str, ...] = TEMPLATE_MARKERS,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer offline and wrap it as a transformers fast tokenizer.

    ``family`` picks the bos/eos/pad convention (see ``FAMILY_TOKENS``); ``extra_texts`` are added to the training
    corpus (the quickstart adds its dataset so its words become single tokens). ``markers`` are the template markers
    registered as special tokens (the family's bos/eos/pad/unk always are): ``()`` gives a tokenizer on which chat
    markers such as ``[INST]`` are plain text, as on Llama-2 / Mistral v1. Deterministic for equal inputs.
    """
    if family not in FAMILY_TOKENS:
        raise ValueError(f"family: {family!r} is not known; choose one of {sorted(FAMILY_TOKENS)}")
    if vocab_size < 300:
        raise ValueError(f"vocab_size: {vocab_size} is too small for a byte-level BPE; use at least 300")
    spec = FAMILY_TOKENS[family]
    own = [t for t in (spec.bos, spec.eos, spec.pad, spec.unk) if t is not None]
    specials = list(dict.fromkeys([*markers, *own]))
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = _BASE_CORPUS.splitlines() + list(extra_texts or [])
    tok.train_from_iterator(corpus, trainer=trainer)
    if spec.bos is not None and spec.add_bos:
        bos_id = tok.token_to_id(spec.bos)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{spec.bos} $A",
            pair=f"{spec.bos} $A {spec.bos} $B",
            special_tokens=[(spec.bos, bos_id)],
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=spec.bos,
        eos_token=spec.eos,
        pad_token=spec.pad,
        unk_token=spec.unk,
        clean_up_tokenization_spaces=False,
        model_max_length=2048,
    )
    return wrapped
