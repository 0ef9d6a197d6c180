"""Unsloth's dataset `apply_chat_template`, list-of-parts message content, and Jinja -> Ollama conversion."""

from __future__ import annotations

import logging

import jinja2
import pytest
from datasets import Dataset
from go_template_subset import Template
from qwen3_like_template import QWEN3_LIKE_JINJA

from fasttune import apply_chat_template, to_sharegpt
from fasttune.data import encode_chat, get_chat_template, render, standardize_data_formats
from fasttune.data.infer_template import TemplateInferenceError, infer_template
from fasttune.data.prompt_template import ALPACA_PROMPT, construct_chat_template, parse_prompt_template

LLAMA3_TWICE = (
    "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n{SYSTEM}<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\n{INPUT}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    "{OUTPUT}<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n{INPUT}<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n{OUTPUT}<|eot_id|>"
)
CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"},
     {"role": "assistant", "content": "d"}],
]


def _go(template, messages):
    system = next((m["content"] for m in messages if m["role"] == "system"), template.default_system or "")
    return Template(template.ollama_template).render(
        {"System": system, "Messages": [{"Role": m["role"], "Content": m["content"]} for m in messages]})


def _alpaca_rows():
    return Dataset.from_dict({"instruction": ["Add the numbers", "Say hi", "Name a colour"],
                              "input": ["1 2", "", ""], "output": ["3", "hi", "blue"]})


def test_alpaca_prompt_parts():
    parts = parse_prompt_template(ALPACA_PROMPT, ("</s>",))
    assert parts.head.startswith("Below are some instructions") and parts.head.endswith("request.")
    assert parts.user_prefix == "\n\n### Instruction:\n" and parts.user_suffix == ""
    assert parts.assistant_prefix == "\n\n### Response:\n" and parts.assistant_end == "</s>"  # EOS appended
    assert parts.system_after is None


def test_apply_chat_template_on_to_sharegpt_output(tiny_tokenizer, caplog):
    tokenizer = tiny_tokenizer("llama")
    data = to_sharegpt(_alpaca_rows(), merged_prompt="{instruction}[[\nYour input is:\n{input}]]",
                       output_column_name="output", conversation_extension=2)
    with caplog.at_level(logging.INFO, logger="fasttune"):
        out = apply_chat_template(data, tokenizer=tokenizer, chat_template=ALPACA_PROMPT)
    text = out[0]["text"]
    assert not text.startswith(tokenizer.bos_token)  # SFTTrainer adds it when it tokenizes the text
    assert text.startswith("Below are some instructions") and text.count("### Instruction:\n") == 2
    assert "Add the numbers\nYour input is:\n1 2\n\n### Response:\n3<|end_of_text|>" in text
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Q"}], tokenize=False, add_generation_prompt=True)
    assert prompt == tokenizer.bos_token + parse_prompt_template(ALPACA_PROMPT, ("x",)).head + \
        "\n\n### Instruction:\nQ\n\n### Response:\n"
    template = tokenizer.fasttune_template
    assert template.response_part == "\n\n### Response:\n" and template.instruction_part == "\n\n### Instruction:\n"
    modelfile = tokenizer._ollama_modelfile
    assert modelfile.startswith("FROM {__FILE_LOCATION__}\nTEMPLATE") and 'PARAMETER stop "<|end_of_text|>"' in modelfile
    for messages in CONVERSATIONS:
        jinja = render(template, messages, add_generation_prompt=messages[-1]["role"] != "assistant",
                       bos_token=tokenizer.bos_token)
        assert template.bos_token + _go(template, messages) == jinja
    assert "it is appended so the model learns to stop" in caplog.text


def test_two_examples_with_system_slot(tiny_tokenizer):
    tokenizer = tiny_tokenizer("llama")
    template = construct_chat_template(tokenizer, LLAMA3_TWICE, default_system_message="Be brief.")
    assert template.bos_token == "<|begin_of_text|>" and template.default_system == "Be brief."
    assert template.instruction_part == "<|start_header_id|>user<|end_header_id|>\n\n"
    assert template.response_part == "<|start_header_id|>assistant<|end_header_id|>\n\n"
    with_system = [{"role": "system", "content": "S"}] + CONVERSATIONS[1]
    for messages in (*CONVERSATIONS, with_system):
        jinja = render(template, messages, add_generation_prompt=messages[-1]["role"] != "assistant")
        assert template.bos_token + _go(template, messages) == jinja
    assert render(template, CONVERSATIONS[0]).startswith(
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>")


@pytest.mark.parametrize("prompt, kwargs, match", [
    ("{INPUT} then {INPUT} {OUTPUT}", {}, "found 2 {INPUT} and 1 {OUTPUT}"),
    ("[SYS]{SYSTEM}[/SYS][USER]{INPUT}[BOT]{OUTPUT}", {}, "default_system_message: the chat_template has {SYSTEM}"),
    (ALPACA_PROMPT, {"default_system_message": "x"}, "would never be used"),
    ("A {INPUT} B {OUTPUT} A {INPUT} C {OUTPUT}", {}, "the two examples differ"),
])
def test_bad_prompt_templates_are_named(tiny_tokenizer, prompt, kwargs, match):
    with pytest.raises(ValueError, match=match):
        construct_chat_template(tiny_tokenizer("llama"), prompt, **kwargs)


def test_system_message_without_slot_is_an_error_naming_the_row(tiny_tokenizer):
    data = Dataset.from_dict({"conversations": [[{"role": "system", "content": "S"}, {"role": "user", "content": "u"},
                                                 {"role": "assistant", "content": "a"}]]})
    with pytest.raises(ValueError, match=r"row 0 .*has no \{SYSTEM\} slot"):
        apply_chat_template(data, tokenizer=tiny_tokenizer("llama"), chat_template=ALPACA_PROMPT)


PARTS = [{"role": "system", "content": [{"type": "text", "text": "Be "}, {"type": "text", "text": "brief."}]},
         {"role": "user", "content": [{"type": "text", "text": "Hi"}]}]
PLAIN = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]


@pytest.mark.parametrize("name", ["gemma-3", "llama-3.1", "chatml", "qwen-3", "gpt-oss", "mistral"])
def test_list_of_text_parts_renders_like_a_string(tiny_tokenizer, name):
    tokenizer = get_chat_template(tiny_tokenizer("gemma3"), name)
    assert tokenizer.apply_chat_template(PARTS, tokenize=False, add_generation_prompt=True) == \
        tokenizer.apply_chat_template(PLAIN, tokenize=False, add_generation_prompt=True)
    assert encode_chat(tokenizer, PARTS, add_generation_prompt=True) == encode_chat(tokenizer, PLAIN,
                                                                                    add_generation_prompt=True)


def test_non_text_part_is_a_named_error(tiny_tokenizer):
    tokenizer = get_chat_template(tiny_tokenizer("gemma3"), "gemma-3")
    image = [{"role": "user", "content": [{"type": "text", "text": "Look"}, {"type": "image"}]}]
    with pytest.raises(jinja2.TemplateError, match="message 0: content part 1 is image; this chat template renders"):
        tokenizer.apply_chat_template(image, tokenize=False)
    with pytest.raises(ValueError, match="message 0: content part 1 is of type 'image'"):
        encode_chat(tokenizer, image)
    with pytest.raises(ValueError, match=r"message 0 \(user\): content part 1 is of type 'image'"):
        render("gemma-3", image)


def test_standardize_data_formats_keeps_text_parts_and_checks_them():
    rows = Dataset.from_dict({"conversations": [[{"from": "human", "value": [{"type": "text", "text": "Hi"}]},
                                                 {"from": "gpt", "value": [{"type": "text", "text": "Yo"}]}]]})
    out = standardize_data_formats(rows)
    assert out[0]["conversations"][0] == {"role": "user", "content": [{"type": "text", "text": "Hi"}]}
    assert render("chatml", out[0]["conversations"]).endswith("<|im_start|>assistant\nYo<|im_end|>\n")
    bad = Dataset.from_list([{"messages": [{"role": "user", "content": [{"type": "text", "text": None}]}]}])
    with pytest.raises(ValueError, match="row 0, message 0, content part 0: a text part needs a string 'text'"):
        standardize_data_formats(bad)


QWEN3_SAMPLES = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"},
     {"role": "user", "content": "More"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"},
     {"role": "assistant", "content": "d"}],
]


@pytest.mark.parametrize("messages", QWEN3_SAMPLES)
def test_qwen3_jinja_converts_to_an_equal_go_template(messages):
    template = infer_template(QWEN3_LIKE_JINJA, "<|im_end|>", None, name="qwen3")
    jinja = render(template, messages, add_generation_prompt=messages[-1]["role"] != "assistant")
    assert _go(template, messages) == jinja
    assert template.default_system is None and template.stop_strings == ("<|im_end|>",)
    if messages[-1]["role"] == "assistant":
        assert "<think>\n\n</think>\n\n" + messages[-1]["content"] in jinja  # the last answer's empty think block


def test_folded_system_prompt_is_refused_with_the_reason(tiny_tokenizer):
    folded = tiny_tokenizer("gemma3").chat_template or get_chat_template(tiny_tokenizer("gemma3"), "gemma-3").chat_template
    with pytest.raises(TemplateInferenceError, match="written inside the first user turn"):
        infer_template(folded, "<end_of_turn>", "<bos>")
    with pytest.raises(TemplateInferenceError, match="cannot render the probe"):
        infer_template("{{ raise_exception('no') }}", "</s>")
