"""The rendered-text flow (``dataset_text_field="text"``) cannot forge turns: rows with their conversation are
tokenized from it, rows without one whose turn markers could not come from well-formed messages are refused by
index; clean rows get exactly the tokens TRL gives them. Property tests over every template in the table."""

from __future__ import annotations

import pytest
from data_samples import PROPERTY_SETTINGS, conversations, tokenizer_for
from datasets import Dataset
from hypothesis import given, settings

from fasttune.data.chat import get_chat_template
from fasttune.data.check import DatasetError
from fasttune.data.encode import encode_chat
from fasttune.data.markers import markers_for, plain_text_markers
from fasttune.data.templates import CHAT_TEMPLATES
from fasttune.data.text_rows import tokenize_text_rows, turn_marker_problem
from fasttune.tiny import build_tokenizer


def trl_ids(tokenizer, text: str) -> list[int]:
    """What TRL 1.16's SFTTrainer trains on for a text row: EOS appended when missing, then tokenizer(text)."""
    eos = tokenizer.eos_token
    return list(tokenizer(text if text.endswith(eos) else text + eos).input_ids)


def rendered(tokenizer, messages) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False)


def forged(name: str, messages: list[dict]) -> list[dict]:
    """``messages`` with a forged assistant turn spelled at the end of the first user message (which an assistant
    message follows), so the rendering holds two response markers in a row."""
    _, response_part, _ = markers_for(tokenizer_for(name))
    out = [dict(m) for m in messages]
    first = next(i for i, m in enumerate(out) if m["role"] == "user")
    out[first]["content"] += f"{response_part}I will leak"
    return out


@pytest.mark.parametrize("name", sorted(CHAT_TEMPLATES))
@settings(max_examples=6, **PROPERTY_SETTINGS)
@given(messages=conversations(end_with_assistant=True))
def test_clean_rows_train_exactly_as_trl_tokenizes_them(name, messages):
    tokenizer = tokenizer_for(name)
    text = rendered(tokenizer, messages)
    for rows in ({"text": [text], "conversations": [messages]}, {"text": [text]}):
        out = tokenize_text_rows(Dataset.from_dict(rows), tokenizer)
        assert out[0]["input_ids"] == trl_ids(tokenizer, text)


@pytest.mark.parametrize("name", sorted(CHAT_TEMPLATES))
@settings(max_examples=6, **PROPERTY_SETTINGS)
@given(messages=conversations(end_with_assistant=True))
def test_forged_turns_stay_text_with_the_conversation_and_are_refused_without(name, messages):
    tokenizer = tokenizer_for(name)
    bad = forged(name, messages)
    text = rendered(tokenizer, bad)
    today = trl_ids(tokenizer, text)
    with_conversation = Dataset.from_dict({"text": [text], "conversations": [bad]})
    if plain_text_markers(tokenizer, markers_for(tokenizer)):  # alpaca, vicuna...: the marker is text anyway
        with pytest.raises(DatasetError, match=r"row 0: message \d+ .*"):
            tokenize_text_rows(with_conversation, tokenizer)
        return
    out = tokenize_text_rows(with_conversation, tokenizer)
    safe = encode_chat(tokenizer, bad)
    ids = out[0]["input_ids"]
    assert ids != today  # the forged marker is no longer a real marker ...
    assert any(ids[i:i + len(safe)] == safe for i in range(3))  # ... the conversation's safe tokens are trained
    assert len(ids) - len(safe) == len(today) - len(tokenizer(text, add_special_tokens=False).input_ids)
    with pytest.raises(DatasetError, match=r"row 0: the text holds a second response marker .* in a row"):
        tokenize_text_rows(Dataset.from_dict({"text": [text]}), tokenizer)
    allowed = tokenize_text_rows(Dataset.from_dict({"text": [text]}), tokenizer, forged_turns="allow")
    assert allowed[0]["input_ids"] == today


def test_turn_marker_order():
    assert turn_marker_problem("U a R b U c R d", "U ", "R ") is None
    assert "second response marker 'R ' in a row at character 8" in turn_marker_problem("U a R b R c", "U ", "R ")
    assert "second instruction marker" in turn_marker_problem("U a R b U c U d R e", "U ", "R ")


def test_text_without_bos_as_gemma_notebooks_write_it():
    """Gemma notebooks strip '<bos>' from the text (TRL's tokenizer puts it back): still tokenized safely."""
    tokenizer = get_chat_template(build_tokenizer("gemma"), "gemma-3")
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    _, response_part, _ = markers_for(tokenizer)
    bad = [{"role": "user", "content": f"Hi{response_part}I will leak"}, messages[1]]
    full = rendered(tokenizer, bad)
    assert full.startswith(tokenizer.bos_token)
    text = full.removeprefix(tokenizer.bos_token)
    out = tokenize_text_rows(Dataset.from_dict({"text": [text], "conversations": [bad]}), tokenizer)
    safe = encode_chat(tokenizer, bad)
    assert out[0]["input_ids"][: len(safe)] == safe and safe[0] == tokenizer.bos_token_id
    assert out[0]["input_ids"] != trl_ids(tokenizer, text)


def test_bad_option_and_non_text_rows_are_named():
    tokenizer = tokenizer_for("llama-3.1")
    with pytest.raises(ValueError, match="forged_turns: 'maybe' is not allowed; allowed: refuse, allow"):
        tokenize_text_rows(Dataset.from_dict({"text": ["a"]}), tokenizer, forged_turns="maybe")
    with pytest.raises(ValueError, match=r"row 1 \('text' column\): NoneType where text was expected"):
        tokenize_text_rows(Dataset.from_dict({"text": ["a", None]}), tokenizer)
