"""Response masks, token by token, for every template and every tiny tokenizer family."""

from __future__ import annotations

import pytest

from fasttune.data import CHAT_TEMPLATES, TokenTexts, get_chat_template, response_mask, response_spans
from fasttune.data.masking import masked_labels, segmented_response_mask
from fasttune.tiny import FAMILIES, build_tokenizer

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi there, how are you?"},
    {"role": "assistant", "content": "Fine, thanks.\n\nAnd you?"},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "It is 4."},
]

# What each template trains on for CONVERSATION: assistant content plus the end-of-turn token (eos = tokenizer's).
def expected_trained_text(name: str, eos: str) -> str:
    first, second = "Fine, thanks.\n\nAnd you?", "It is 4."
    end = {"chatml": "<|im_end|>", "qwen-2.5": "<|im_end|>", "phi-4": "<|im_end|>", "llama-3": "<|eot_id|>",
           "llama-3.1": "<|eot_id|>", "mistral": "</s>", "gemma": "<end_of_turn>", "phi-3": "<|end|>",
           "zephyr": "</s>", "vicuna": eos, "alpaca": eos, "unsloth": eos}
    if name == "qwen-3":
        return f"{first}<|im_end|><think>\n\n</think>\n\n{second}<|im_end|>"
    if name == "gpt-oss":
        return f"<|channel|>final<|message|>{first}<|end|><|channel|>final<|message|>{second}<|return|>"
    prefix = " " if name in ("mistral", "vicuna") else ""
    return f"{prefix}{first}{end[name]}{prefix}{second}{end[name]}"


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", sorted(CHAT_TEMPLATES))
def test_mask_matches_generation_spans_token_by_token(name, family, fresh_tokenizer):
    tokenizer = get_chat_template(fresh_tokenizer(family), name)
    template = tokenizer.fasttune_template
    out = tokenizer.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True,
                                        return_assistant_tokens_mask=True)
    ids = out["input_ids"]
    mask = response_mask(ids, tokenizer, template.instruction_part, template.response_part, template.end_parts)
    texts = TokenTexts(tokenizer)
    for i, (ours, trl) in enumerate(zip(mask, out["assistant_masks"])):
        assert ours == trl, f"token {i} {texts.piece(ids[i])!r}: fasttune {ours}, {{% generation %}} {trl}"
    trained = "".join(texts.piece(t) for t, m in zip(ids, mask) if m)
    assert trained == expected_trained_text(name, tokenizer.eos_token)
    # The token just before each span is the last token of the response marker, never trained.
    assert mask[0] == 0 and len(mask) == len(ids)


def test_response_spans_unsloth_rule_and_end_parts():
    text = "U: a\nA: b<e>\nU: c\nA: d<e>\n"
    assert [text[s:e] for s, e in response_spans(text, "U:", "A:")] == [" b<e>\n", " d<e>\n"]
    assert [text[s:e] for s, e in response_spans(text, "U:", "A:", ("<e>",))] == [" b<e>", " d<e>"]
    assert response_spans("U: nothing here", "U:", "A:") == []
    with pytest.raises(ValueError, match="response_part"):
        response_spans(text, "U:", "")


def test_marker_split_by_bpe_merge_is_still_found():
    tokenizer = get_chat_template(build_tokenizer("llama", extra_texts=[" Hello world"] * 50), "unsloth")
    template = tokenizer.fasttune_template
    marker_ids = tokenizer.encode(template.response_part, add_special_tokens=False)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
                                        return_dict=False)
    as_ids = any(ids[i:i + len(marker_ids)] == marker_ids for i in range(len(ids)))
    assert not as_ids, "precondition: the marker's token ids do not occur because ' Hello' merged with its space"
    mask = response_mask(ids, tokenizer, template.instruction_part, template.response_part, template.end_parts)
    texts = TokenTexts(tokenizer)
    assert "".join(texts.piece(t) for t, m in zip(ids, mask) if m) == " Hello" + tokenizer.eos_token


def test_packed_sequences_are_masked_per_sequence(fresh_tokenizer):
    tokenizer = get_chat_template(fresh_tokenizer("qwen2"), "chatml")
    full = tokenizer.apply_chat_template(CONVERSATION, return_dict=False)
    cut = full[: full.index(tokenizer.convert_tokens_to_ids("<|im_end|>"), len(full) - 8)]  # last reply unterminated
    second = tokenizer.apply_chat_template(CONVERSATION[1:3], return_dict=False)
    args = ("<|im_start|>user\n", "<|im_start|>assistant\n", ("<|im_end|>",))
    packed = segmented_response_mask(cut + second, tokenizer, *args, seq_lengths=[len(cut), len(second)])
    assert packed == response_mask(cut, tokenizer, *args) + response_mask(second, tokenizer, *args)
    assert packed[len(cut)] == 0  # the second sequence starts with its (untrained) user turn
    with pytest.raises(ValueError, match="seq_lengths"):
        segmented_response_mask(cut, tokenizer, *args, seq_lengths=[1])


def test_masked_labels_keeps_previous_ignores():
    assert masked_labels([5, 6, 7, 8], [0, 1, 1, 1], [5, 6, -100, 8]) == [-100, 6, -100, 8]
    assert masked_labels([5, 6], [1, 0]) == [5, -100]


def legacy_sentencepiece_tokenizer():
    """A Llama-2/Mistral-v1 style fast tokenizer: '▁' for spaces, a '▁' prepended to every text segment (also after
    special tokens, the 'legacy' behaviour), no byte-level pre-tokenizer."""
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers
    from transformers import PreTrainedTokenizerFast

    from fasttune.tiny.tokenizer import TEMPLATE_MARKERS

    tok = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    trainer = trainers.BpeTrainer(vocab_size=800, special_tokens=list(dict.fromkeys(TEMPLATE_MARKERS)),
                                  show_progress=False)
    corpus = ["You are terse. Hi there, how are you? What is 2+2? ### Instruction:\n### Response:\nUSER: ASSISTANT:",
              "Fine, thanks.\n\nAnd you? It is 4. >>> User: >>> Assistant: final system user assistant model"] * 5
    tok.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", clean_up_tokenization_spaces=False)


@pytest.fixture(scope="module")
def sentencepiece_tokenizer():
    return legacy_sentencepiece_tokenizer()


@pytest.mark.parametrize("name", sorted(CHAT_TEMPLATES))
def test_mask_matches_generation_spans_with_legacy_sentencepiece(name, sentencepiece_tokenizer):
    import copy

    tokenizer = get_chat_template(copy.deepcopy(sentencepiece_tokenizer), name)
    template = tokenizer.fasttune_template
    out = tokenizer.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True,
                                        return_assistant_tokens_mask=True)
    mask = response_mask(out["input_ids"], tokenizer, template.instruction_part, template.response_part,
                         template.end_parts)
    assert sum(mask) > 0 and mask == out["assistant_masks"]


def test_marker_pattern_allows_the_legacy_space_after_special_tokens():
    from fasttune.data.masking import marker_pattern

    pattern = marker_pattern("<|im_start|>assistant\n", {"<|im_start|>", "<|im_end|>"})
    assert pattern.fullmatch("<|im_start|> assistant\n") and pattern.fullmatch("<|im_start|>assistant\n")
    assert not pattern.fullmatch("<|im_start|>  assistant\n")
    assert marker_pattern("A: ", ()).pattern == "A:\\ "


def _tokenized_rows(tokenizer, conversations):
    from datasets import Dataset

    ids = [tokenizer.apply_chat_template(c, return_dict=False) for c in conversations]
    return Dataset.from_dict({"input_ids": ids, "labels": ids})


def test_train_on_responses_only_masks_eval_dicts_and_iterable_datasets(fresh_tokenizer):
    from types import SimpleNamespace

    from fasttune.data import train_on_responses_only

    tokenizer = get_chat_template(fresh_tokenizer("qwen3"), "qwen-3")
    rows = _tokenized_rows(tokenizer, [CONVERSATION, CONVERSATION[1:3]])
    trainer = SimpleNamespace(processing_class=tokenizer, args=SimpleNamespace(max_length=None),
                              train_dataset=rows.to_iterable_dataset(), eval_dataset={"a": rows, "b": rows})
    train_on_responses_only(trainer)
    texts = TokenTexts(tokenizer)
    for dataset in (list(trainer.train_dataset), trainer.eval_dataset["a"], trainer.eval_dataset["b"]):
        trained = ["".join(texts.piece(t) for t in row["labels"] if t != -100) for row in dataset]
        assert trained == [expected_trained_text("qwen-3", tokenizer.eos_token),
                           "<think>\n\n</think>\n\nFine, thanks.\n\nAnd you?<|im_end|>"]
    with pytest.raises(ValueError, match="no 'input_ids' column"):
        train_on_responses_only(SimpleNamespace(processing_class=tokenizer, train_dataset=rows.select_columns([]),
                                                eval_dataset=None))
