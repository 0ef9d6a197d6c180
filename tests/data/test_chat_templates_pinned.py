"""Every template's full rendered text is pinned (system prompt, several turns, generation prompt).

The expected strings are written out from each family's published prompt format, not produced by the code.
"""

from __future__ import annotations

import pytest
from data_samples import CONVERSATION, NO_SYSTEM

from fasttune.data import CHAT_TEMPLATES, render, resolve_template, template_names

IM = "<|im_start|>"
L3 = "<|start_header_id|>"
L3E = "<|end_header_id|>\n\n"
L31 = f"<|begin_of_text|>{L3}system{L3E}Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"
VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
                 "detailed, and polite answers to the user's questions.")
ALPACA_SYSTEM = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
                 "request.")
HARMONY = ("<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.\nKnowledge cutoff: "
           "2024-06\nCurrent date: 2025-06-28\n\nReasoning: medium\n\n# Valid channels: analysis, commentary, final. "
           "Channel must be included for every message.<|end|>")

# (template, messages, expected) with add_generation_prompt=True; alpaca/vicuna/unsloth use eos </s>, bos <s>.
PINNED = {
    "chatml": (CONVERSATION,
               f"{IM}system\nYou are terse.<|im_end|>\n{IM}user\nHi!<|im_end|>\n{IM}assistant\nHello.<|im_end|>\n"
               f"{IM}user\n2+2?<|im_end|>\n{IM}assistant\n4<|im_end|>\n{IM}user\nThanks<|im_end|>\n{IM}assistant\n"),
    "qwen-2.5": (NO_SYSTEM,
                 f"{IM}system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
                 f"{IM}user\nHi!<|im_end|>\n{IM}assistant\nHello.<|im_end|>\n{IM}user\n2+2?<|im_end|>\n"
                 f"{IM}assistant\n4<|im_end|>\n{IM}user\nThanks<|im_end|>\n{IM}assistant\n"),
    "qwen-3": (CONVERSATION,
               f"{IM}system\nYou are terse.<|im_end|>\n{IM}user\nHi!<|im_end|>\n{IM}assistant\nHello.<|im_end|>\n"
               f"{IM}user\n2+2?<|im_end|>\n{IM}assistant\n4<|im_end|>\n{IM}user\nThanks<|im_end|>\n{IM}assistant\n"),
    "phi-4": (CONVERSATION,
              "<|im_start|>system<|im_sep|>You are terse.<|im_end|><|im_start|>user<|im_sep|>Hi!<|im_end|>"
              "<|im_start|>assistant<|im_sep|>Hello.<|im_end|><|im_start|>user<|im_sep|>2+2?<|im_end|>"
              "<|im_start|>assistant<|im_sep|>4<|im_end|><|im_start|>user<|im_sep|>Thanks<|im_end|>"
              "<|im_start|>assistant<|im_sep|>"),
    "llama-3": (CONVERSATION,
                f"<|begin_of_text|>{L3}system{L3E}You are terse.<|eot_id|>{L3}user{L3E}Hi!<|eot_id|>"
                f"{L3}assistant{L3E}Hello.<|eot_id|>{L3}user{L3E}2+2?<|eot_id|>{L3}assistant{L3E}4<|eot_id|>"
                f"{L3}user{L3E}Thanks<|eot_id|>{L3}assistant{L3E}"),
    "llama-3.1": (CONVERSATION,
                  f"{L31}You are terse.<|eot_id|>{L3}user{L3E}Hi!<|eot_id|>{L3}assistant{L3E}Hello.<|eot_id|>"
                  f"{L3}user{L3E}2+2?<|eot_id|>{L3}assistant{L3E}4<|eot_id|>{L3}user{L3E}Thanks<|eot_id|>"
                  f"{L3}assistant{L3E}"),
    "mistral": (CONVERSATION,
                "<s>[INST] Hi![/INST] Hello.</s>[INST] 2+2?[/INST] 4</s>[INST] You are terse.\n\nThanks[/INST]"),
    "gemma": (CONVERSATION,
              "<bos><start_of_turn>user\nYou are terse.\n\nHi!<end_of_turn>\n<start_of_turn>model\nHello.<end_of_turn>\n"
              "<start_of_turn>user\n2+2?<end_of_turn>\n<start_of_turn>model\n4<end_of_turn>\n"
              "<start_of_turn>user\nThanks<end_of_turn>\n<start_of_turn>model\n"),
    "phi-3": (CONVERSATION,
              "<|system|>\nYou are terse.<|end|>\n<|user|>\nHi!<|end|>\n<|assistant|>\nHello.<|end|>\n<|user|>\n2+2?<|end|>\n"
              "<|assistant|>\n4<|end|>\n<|user|>\nThanks<|end|>\n<|assistant|>\n"),
    "zephyr": (CONVERSATION,
               "<|system|>\nYou are terse.</s>\n<|user|>\nHi!</s>\n<|assistant|>\nHello.</s>\n<|user|>\n2+2?</s>\n"
               "<|assistant|>\n4</s>\n<|user|>\nThanks</s>\n<|assistant|>\n"),
    "vicuna": (NO_SYSTEM,
               f"<s>{VICUNA_SYSTEM} USER: Hi! ASSISTANT: Hello.</s>USER: 2+2? ASSISTANT: 4</s>USER: Thanks ASSISTANT:"),
    "alpaca": (NO_SYSTEM,
               f"<s>{ALPACA_SYSTEM}\n\n### Instruction:\nHi!\n\n### Response:\nHello.</s>\n\n### Instruction:\n2+2?\n\n"
               "### Response:\n4</s>\n\n### Instruction:\nThanks\n\n### Response:\n"),
    "unsloth": (NO_SYSTEM,
                "<s>You are a helpful assistant to the user\n>>> User: Hi!\n>>> Assistant: Hello.</s>\n>>> User: 2+2?\n"
                ">>> Assistant: 4</s>\n>>> User: Thanks\n>>> Assistant: "),
    "gpt-oss": (CONVERSATION,
                HARMONY + "<|start|>developer<|message|># Instructions\n\nYou are terse.\n\n<|end|>"
                "<|start|>user<|message|>Hi!<|end|><|start|>assistant<|channel|>final<|message|>Hello.<|end|>"
                "<|start|>user<|message|>2+2?<|end|><|start|>assistant<|channel|>final<|message|>4<|end|>"
                "<|start|>user<|message|>Thanks<|end|><|start|>assistant"),
}


def test_every_template_is_pinned():
    assert sorted(PINNED) == sorted(CHAT_TEMPLATES)


@pytest.mark.parametrize("name", sorted(PINNED))
def test_rendered_text_is_pinned(name):
    messages, expected = PINNED[name]
    assert render(name, messages, add_generation_prompt=True, eos_token="</s>", bos_token="<s>") == expected


@pytest.mark.parametrize("name", sorted(PINNED))
def test_no_generation_prompt_drops_only_the_prompt(name):
    messages, expected = PINNED[name]
    template = resolve_template(name)
    plain = render(name, messages, eos_token="</s>", bos_token="<s>")
    prompt = template.bind("</s>", "<s>").response_part if name != "mistral" else ""
    prompt = {"vicuna": "ASSISTANT:", "gpt-oss": "<|start|>assistant"}.get(name, prompt)
    assert plain + prompt == expected


@pytest.mark.parametrize("alias", [a for a in template_names() if a not in CHAT_TEMPLATES])
def test_aliases_render_like_their_template(alias):
    template = resolve_template(alias)
    messages, expected = PINNED[template.name]
    assert render(alias, messages, add_generation_prompt=True, eos_token="</s>", bos_token="<s>") == expected


def test_llama31_without_system_keeps_the_date_header():
    expected = f"{L31}<|eot_id|>{L3}user{L3E}Hi!<|eot_id|>{L3}assistant{L3E}"
    assert render("llama-3.2", NO_SYSTEM[:1], add_generation_prompt=True) == expected


def test_qwen3_generation_prompt_without_thinking():
    text = render("qwen-3", NO_SYSTEM, add_generation_prompt=True, enable_thinking=False)
    assert text.endswith(f"{IM}user\nThanks<|im_end|>\n{IM}assistant\n<think>\n\n</think>\n\n")
    thinking = render("qwen-3", NO_SYSTEM, add_generation_prompt=True, enable_thinking=True)
    assert thinking.endswith(f"{IM}assistant\n")


def test_qwen3_training_conversation_thinks_only_after_the_last_query():
    messages = [
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "<think>\nsay hi\n</think>\n\nHello."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4", "reasoning_content": "two plus two"},
    ]
    assert render("qwen-3", messages) == (
        f"{IM}user\nHi!<|im_end|>\n{IM}assistant\nHello.<|im_end|>\n{IM}user\n2+2?<|im_end|>\n"
        f"{IM}assistant\n<think>\ntwo plus two\n</think>\n\n4<|im_end|>\n"
    )
    no_reasoning = render("qwen-3", messages[:3] + [{"role": "assistant", "content": "4"}])
    assert no_reasoning.endswith(f"{IM}assistant\n<think>\n\n</think>\n\n4<|im_end|>\n")


def test_gpt_oss_training_conversation_ends_with_return_and_analysis():
    messages = NO_SYSTEM[:2] + [{"role": "user", "content": "2+2?"},
                                {"role": "assistant", "content": "4", "thinking": "add them"}]
    assert render("gpt-oss", messages, reasoning_effort="high", current_date="2026-01-02") == (
        HARMONY.replace("2025-06-28", "2026-01-02").replace("medium", "high")
        + "<|start|>user<|message|>Hi!<|end|><|start|>assistant<|channel|>final<|message|>Hello.<|end|>"
        "<|start|>user<|message|>2+2?<|end|><|start|>assistant<|channel|>analysis<|message|>add them<|end|>"
        "<|start|>assistant<|channel|>final<|message|>4<|return|>"
    )


def test_every_template_marks_assistant_spans_for_trl():
    from trl.chat_template_utils import has_generation_markers

    for template in CHAT_TEMPLATES.values():
        assert has_generation_markers(template.jinja), template.name


def test_unknown_template_lists_all_names():
    with pytest.raises(ValueError, match="not a known template") as info:
        resolve_template("llama-9")
    for name in CHAT_TEMPLATES:
        assert repr(name) in str(info.value)
