"""Each template's Ollama Go template renders the same text as its Jinja (minus the BOS llama.cpp adds).

Contract (fasttune.data.spec): jinja(messages, add_generation_prompt=last role != assistant)
    == bos_token + go(System=<system message, or default_system, or "">, Messages=messages).
"""

from __future__ import annotations

import pytest
from data_samples import CONVERSATION, NO_SYSTEM, PROPERTY_SETTINGS, conversations
from go_template_subset import Template
from hypothesis import assume, given, settings

from fasttune.data import CHAT_TEMPLATES, render


def go_render(template, messages, **extra):
    system = next((m["content"] for m in messages if m["role"] == "system"), None)
    if system is None:
        system = template.default_system or ""
    data = {"System": system, "Messages": [{"Role": m["role"], "Content": m["content"],
                                            **({"Thinking": m["thinking"]} if "thinking" in m else {})}
                                           for m in messages], **extra}
    return Template(template.ollama_template).render(data)


def check(name, messages, **extra):
    template = CHAT_TEMPLATES[name].bind("</s>", "<s>")
    jinja = render(name, messages, add_generation_prompt=messages[-1]["role"] != "assistant", eos_token="</s>",
                   bos_token="<s>", **({"enable_thinking": extra["Think"]} if "Think" in extra else {}))
    assert template.bos_token + go_render(template, messages, **extra) == jinja


@pytest.mark.parametrize("name", sorted(CHAT_TEMPLATES))
@pytest.mark.parametrize("messages", [CONVERSATION, NO_SYSTEM, CONVERSATION[:3], NO_SYSTEM[:2]],
                         ids=["system-gen", "nosystem-gen", "system-train", "nosystem-train"])
def test_go_template_matches_jinja(name, messages):
    check(name, messages)


def test_qwen3_no_thinking_prompt_and_gpt_oss_thinking():
    check("qwen-3", NO_SYSTEM, IsThinkSet=True, Think=False)
    check("gpt-oss", NO_SYSTEM[:1] + [{"role": "assistant", "content": "Hello.", "thinking": "greet back"}])


@pytest.mark.parametrize("name", sorted(CHAT_TEMPLATES))
@settings(max_examples=8, **PROPERTY_SETTINGS)
@given(messages=conversations())
def test_go_template_matches_jinja_on_random_conversations(name, messages):
    if name == "qwen-3":  # Qwen-3's Jinja strips newlines at the start of the answer; Go templates cannot strip
        assume(not any(m["role"] == "assistant" and m["content"].startswith("\n") for m in messages))
    check(name, messages)


def test_go_helper_catches_a_difference():
    template = CHAT_TEMPLATES["chatml"]
    broken = Template(template.ollama_template.replace("<|im_end|>\n", "<|im_end|>", 1))
    assert broken.render({"System": "S", "Messages": []}) != render("chatml", [{"role": "system", "content": "S"}],
                                                                   add_generation_prompt=True)
