"""Property tests over random conversations: rendering never crashes on valid input, the response mask keeps
exactly the assistant tokens (it equals the ``{% generation %}`` mask transformers computes), and invalid input
always gets the clear ``ValueError``, never an error from inside Jinja."""

from __future__ import annotations

import jinja2
import pytest
from data_samples import PROPERTY_SETTINGS, conversations, texts_for, tokenizer_for
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from fasttune.data import CHAT_TEMPLATES, render, response_mask


@pytest.mark.parametrize("name", sorted(CHAT_TEMPLATES))
@settings(max_examples=12, **PROPERTY_SETTINGS)
@given(messages=conversations(end_with_assistant=True))
def test_mask_keeps_exactly_the_assistant_tokens(name, messages):
    tokenizer = tokenizer_for(name)
    template = tokenizer.fasttune_template
    out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    mask = response_mask(out["input_ids"], texts_for(name), template.instruction_part, template.response_part,
                         template.end_parts)
    assert mask == out["assistant_masks"]
    assert out["input_ids"][max(i for i, m in enumerate(mask) if m)] == tokenizer.convert_tokens_to_ids(
        template.end_parts[-1] if name != "gpt-oss" else "<|return|>")


@pytest.mark.parametrize("name", sorted(CHAT_TEMPLATES))
@settings(max_examples=8, **PROPERTY_SETTINGS)
@given(messages=conversations(end_with_assistant=False))
def test_rendering_valid_input_never_crashes(name, messages):
    text = render(name, messages, add_generation_prompt=True, eos_token="</s>", bos_token="<s>")
    for message in messages:
        assert message["content"] in text


def _break(messages, how, value):
    messages = [dict(m) for m in messages]
    if how == "role":
        messages[value % len(messages)]["role"] = "tool"
    elif how == "content":
        messages[value % len(messages)]["content"] = [None, 3, "", "  \n", {"text": "x"}][value % 5]
    elif how == "late_system":
        messages.append({"role": "system", "content": "late"})
    elif how == "not_a_dict":
        messages[value % len(messages)] = "hello"
    elif how == "empty":
        messages = []
    return messages


@pytest.mark.parametrize("name", sorted(CHAT_TEMPLATES))
@settings(max_examples=8, **PROPERTY_SETTINGS)
@given(messages=conversations(), how=st.sampled_from(["role", "content", "late_system", "not_a_dict", "empty"]),
       value=st.integers(0, 100))
def test_invalid_input_gets_the_clear_error(name, messages, how, value):
    broken = _break(messages, how, value)
    with pytest.raises(ValueError, match="invalid conversation: "):
        render(name, broken, add_generation_prompt=True, eos_token="</s>", bos_token="<s>")


@pytest.mark.parametrize("name", sorted(CHAT_TEMPLATES))
@settings(max_examples=8, **PROPERTY_SETTINGS)
@given(messages=conversations(), how=st.sampled_from(["role", "content", "late_system"]), value=st.integers(0, 100))
def test_invalid_input_to_the_tokenizer_gets_a_named_template_error(name, messages, how, value):
    broken = _break(messages, how, value)
    assume(not (how == "content" and isinstance(broken[value % len(broken)]["content"], str)))  # "" is renderable
    with pytest.raises(jinja2.TemplateError, match=r"^message \d+: "):
        tokenizer_for(name).apply_chat_template(broken, tokenize=False)
