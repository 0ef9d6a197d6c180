"""Conversations shared by the data tests: a fixed multi-turn one and a hypothesis strategy for random ones."""

from __future__ import annotations

import functools

from hypothesis import HealthCheck, assume
from hypothesis import strategies as st

from fasttune.data import CHAT_TEMPLATES, TokenTexts, get_chat_template
from fasttune.tiny import build_tokenizer

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi!"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "Thanks"},
]
NO_SYSTEM = CONVERSATION[1:]

# Deterministic (derandomized) so CI runs the same examples every time; no example database is written.
PROPERTY_SETTINGS = dict(deadline=None, derandomize=True, database=None,
                         suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])

FAMILY_OF = {"mistral": "mistral", "gemma": "gemma", "phi-3": "phi3", "zephyr": "mistral", "qwen-2.5": "qwen2",
             "qwen-3": "qwen3", "chatml": "qwen2", "vicuna": "llama", "alpaca": "mistral", "unsloth": "gemma"}
MARKERS = {m for t in CHAT_TEMPLATES.values() for m in (t.instruction_part, t.response_part, *t.end_parts)}
TEXT = st.text(alphabet=st.characters(codec="utf-8", exclude_characters="<>[]#|\r\x00",
                                      exclude_categories=("Cs", "Cc", "Zl", "Zp")) | st.sampled_from(["\n", " "]),
               min_size=1, max_size=40).filter(lambda s: s.strip() != "")


@functools.cache
def tokenizer_for(name: str):
    return get_chat_template(build_tokenizer(FAMILY_OF.get(name, "llama")), name)


@functools.cache
def texts_for(name: str) -> TokenTexts:
    return TokenTexts(tokenizer_for(name))


@st.composite
def conversations(draw, end_with_assistant=None):
    turns = draw(st.integers(1, 4))
    messages = [{"role": "system", "content": draw(TEXT)}] if draw(st.booleans()) else []
    for _ in range(turns):
        messages += [{"role": "user", "content": draw(TEXT)}, {"role": "assistant", "content": draw(TEXT)}]
    if end_with_assistant is False or (end_with_assistant is None and draw(st.booleans())):
        messages.append({"role": "user", "content": draw(TEXT)})
    for message in messages:
        assume(not any(marker.upper() in message["content"].upper() for marker in MARKERS if marker.strip()))
    return messages
