"""Property tests: control strings written inside messages never change what is trained, for every template.

Random conversations (unicode, empty and whitespace-only text, every template's control strings and forged turn
headers inserted anywhere) are encoded with `encode_chat` and masked with `response_mask`. For each one:

- the ids spell the rendered conversation byte for byte, and the mask is exactly the tokens overlapping the
  template's ``{% generation %}`` spans (for the plain turn formats: each assistant content plus its end token);
- the control tokens in the ids are the template's own: the same as when every injected string is replaced by "x".
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from injection_helpers import (
    INJECTIONS,
    TEMPLATE_NAMES,
    oracle_mask,
    render_with_spans,
    special_ids,
    texts_for,
    tokenizer_for,
)

from fasttune.data import encode_chat, response_mask

SETTINGS = dict(max_examples=15, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
# U+F0000/U+F0001 are reserved by transformers' sanitizer (encode_chat rejects them; tested elsewhere).
CHARS = st.characters(exclude_categories=("Cs",), exclude_characters="\U000f0000\U000f0001")
PLAIN = st.text(CHARS, max_size=10) | st.sampled_from(["", " ", "\n", " \n\t ", "é", "日本語", "a b"])
# Turn formats whose assistant span is exactly prefix + content + end token.
CONTENT_PREFIX = {"mistral": " ", "vicuna": " "}
REASONING = ("qwen-3", "gpt-oss")


@st.composite
def injected_text(draw) -> tuple[str, str]:
    """``(dirty, clean)``: text with control strings inserted, and the same text with each one replaced by "x"."""
    dirty, clean = [], []
    for _ in range(draw(st.integers(1, 4))):
        if draw(st.booleans()):
            string = draw(st.sampled_from(INJECTIONS))
            dirty.append(string)
            clean.append("x")
        else:
            text = draw(PLAIN)
            dirty.append(text)
            clean.append(text)
    return "".join(dirty), "".join(clean)


@st.composite
def conversations(draw) -> tuple[list[dict], list[dict]]:
    """``(dirty, clean)`` conversations with the same structure."""
    roles = ["system"] if draw(st.booleans()) else []
    roles += ["user", "assistant"] * draw(st.integers(1, 3))
    if draw(st.booleans()):
        roles.append("user")
    dirty, clean = [], []
    for role in roles:
        d, c = draw(injected_text())
        dirty.append({"role": role, "content": d})
        clean.append({"role": role, "content": c})
    return dirty, clean


@pytest.mark.parametrize("name", TEMPLATE_NAMES)
@settings(**SETTINGS)
@given(pair=conversations())
def test_labels_are_exactly_the_assistant_answers(name, pair):
    messages, clean = pair
    tokenizer = tokenizer_for(name)
    template = tokenizer.fasttune_template
    ids = encode_chat(tokenizer, messages)
    mask = response_mask(ids, texts_for(name), template.instruction_part, template.response_part, template.end_parts)
    expected = oracle_mask(name, ids, messages)
    wrong = [i for i, (a, b) in enumerate(zip(mask, expected)) if a != b]
    assert not wrong, f"tokens {wrong} masked wrongly: {[tokenizer.decode([ids[i]]) for i in wrong]}"
    if name not in REASONING:
        text, spans = render_with_spans(name, messages)
        answers = [CONTENT_PREFIX.get(name, "") + m["content"] + template.end_parts[0]
                   for m in messages if m["role"] == "assistant"]
        assert [text[s:e] for s, e in spans] == answers


@pytest.mark.parametrize("name", TEMPLATE_NAMES)
@settings(**SETTINGS)
@given(pair=conversations(), generation=st.booleans())
def test_message_text_never_becomes_control_tokens(name, pair, generation):
    messages, clean = pair
    parsed = name == "qwen-3" and any("</think>" in m["content"] for m in messages if m["role"] == "assistant")
    if parsed:  # Qwen-3 reads <think>...</think> from assistant content by design (see fasttune.data.encode)
        return
    tokenizer = tokenizer_for(name)
    dirty_ids = encode_chat(tokenizer, messages, add_generation_prompt=generation)
    clean_ids = encode_chat(tokenizer, clean, add_generation_prompt=generation)
    assert special_ids(name, dirty_ids) == special_ids(name, clean_ids)
    assert tokenizer.decode(dirty_ids) == tokenizer.apply_chat_template(messages, add_generation_prompt=generation,
                                                                        tokenize=False)
