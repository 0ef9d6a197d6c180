"""get_chat_template: template, eos, mapping, system message, recorded ChatTemplate, clear errors."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import jinja2
import pytest

from fasttune.data import (
    CHAT_TEMPLATES,
    detect_template,
    get_chat_template,
    markers_for,
    render,
    sync_model_eos,
)
from fasttune.data.spec import BOS_PLACEHOLDER, EOS_PLACEHOLDER

CONV = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]


def test_sets_template_eos_and_records_bound_template(fresh_tokenizer):
    tokenizer = get_chat_template(fresh_tokenizer("llama"), "chatml")
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") == tokenizer.eos_token_id
    assert tokenizer.chat_template == CHAT_TEMPLATES["chatml"].jinja
    assert tokenizer.fasttune_template.name == "chatml" and tokenizer.fasttune_added_tokens == []
    text = tokenizer.apply_chat_template(CONV, tokenize=False)
    assert text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n"


@pytest.mark.parametrize("name", ["alpaca", "vicuna", "unsloth"])
def test_tokenizer_eos_templates_are_bound_to_the_tokenizer(fresh_tokenizer, name):
    raw = CHAT_TEMPLATES[name]
    assert not raw.is_bound and EOS_PLACEHOLDER in raw.ollama_template
    tokenizer = get_chat_template(fresh_tokenizer("mistral"), name)
    bound = tokenizer.fasttune_template
    assert bound.is_bound and bound.eos_token == "</s>" and bound.stop_strings == ("</s>",)
    assert bound.bos_token == "<s>" and EOS_PLACEHOLDER not in bound.ollama_template
    assert BOS_PLACEHOLDER not in bound.ollama_template and "</s>" in bound.ollama_template
    assert tokenizer.apply_chat_template(CONV, tokenize=False).startswith("<s>")


def test_qwen_tokenizer_without_bos_renders_no_bos(fresh_tokenizer):
    tokenizer = get_chat_template(fresh_tokenizer("qwen2"), "alpaca")
    assert tokenizer.fasttune_template.bos_token == ""
    assert tokenizer.apply_chat_template(CONV, tokenize=False).startswith("Below is an instruction")


def test_map_eos_token_false_keeps_eos(fresh_tokenizer):
    tokenizer = get_chat_template(fresh_tokenizer("llama"), "chatml", map_eos_token=False)
    assert tokenizer.eos_token == "<|end_of_text|>"
    assert tokenizer.fasttune_template.eos_token == "<|im_end|>"


def test_missing_end_of_turn_token_is_added_and_reported(fresh_tokenizer, caplog):
    tokenizer = fresh_tokenizer("llama")
    before = len(tokenizer)
    jinja = "{% for m in messages %}{{ m['content'] }}{% generation %}<|my_eot|>{% endgeneration %}{% endfor %}"
    with caplog.at_level(logging.WARNING, logger="fasttune.data.chat"):
        get_chat_template(tokenizer, (jinja, "<|my_eot|>"))
    assert len(tokenizer) == before + 1 and tokenizer.fasttune_added_tokens == ["<|my_eot|>"]
    assert tokenizer.encode("<|my_eot|>", add_special_tokens=False) == [tokenizer.eos_token_id]
    assert "resize_token_embeddings" in caplog.text


def test_tuple_with_eos_token_keyword_keeps_tokenizer_eos(fresh_tokenizer):
    tokenizer = get_chat_template(fresh_tokenizer("gemma"), ("{{ messages[0]['content'] }}", "eos_token"))
    assert tokenizer.eos_token == "<eos>" and tokenizer.fasttune_template.name == "custom"
    with pytest.raises(ValueError, match="instruction_part=... and response_part"):
        markers_for(tokenizer)
    with pytest.raises(ValueError, match="system_message: template 'custom'"):
        get_chat_template(fresh_tokenizer("gemma"), ("{{ messages[0]['content'] }}", "eos_token"), system_message="S")


def test_mapping_renders_sharegpt_like_openai(fresh_tokenizer):
    mapping = {"role": "from", "content": "value", "user": "human", "assistant": "gpt"}
    tokenizer = get_chat_template(fresh_tokenizer("llama"), "llama-3", mapping=mapping)
    sharegpt = [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]
    expected = render("llama-3", CONV)
    assert tokenizer.apply_chat_template(sharegpt, tokenize=False) == expected
    assert tokenizer.apply_chat_template(CONV, tokenize=False) == expected
    with pytest.raises(ValueError, match="allowed keys"):
        get_chat_template(fresh_tokenizer("llama"), "llama-3", mapping={"speaker": "from"})


def test_system_message_replaces_the_default(fresh_tokenizer):
    tokenizer = get_chat_template(fresh_tokenizer("qwen2"), "qwen-2.5", system_message='Be "nice".\nAlways.')
    assert tokenizer.fasttune_template.default_system == 'Be "nice".\nAlways.'
    text = tokenizer.apply_chat_template(CONV, tokenize=False)
    assert text.startswith('<|im_start|>system\nBe "nice".\nAlways.<|im_end|>\n<|im_start|>user\nHi')
    own = tokenizer.apply_chat_template([{"role": "system", "content": "Mine"}, *CONV], tokenize=False)
    assert own.startswith("<|im_start|>system\nMine<|im_end|>\n") and "nice" not in own
    chatml = get_chat_template(fresh_tokenizer("qwen2"), "chatml", system_message="Sys")
    assert chatml.apply_chat_template(CONV, tokenize=False).startswith("<|im_start|>system\nSys<|im_end|>\n")


def test_unknown_name_and_bad_arguments(fresh_tokenizer):
    with pytest.raises(ValueError, match="'chatml'"):
        get_chat_template(fresh_tokenizer("llama"), "chatmlx")
    with pytest.raises(ValueError, match="tuple must be"):
        get_chat_template(fresh_tokenizer("llama"), ("a", "b", "c"))
    with pytest.raises(TypeError, match="tokenizer"):
        get_chat_template("not a tokenizer", "chatml")


def test_bad_role_inside_jinja_is_a_clear_template_error(fresh_tokenizer):
    tokenizer = get_chat_template(fresh_tokenizer("llama"), "llama-3")
    with pytest.raises(jinja2.TemplateError, match="role tool is not supported"):
        tokenizer.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)
    with pytest.raises(ValueError, match="unknown role 'tool'"):
        render("llama-3", [{"role": "tool", "content": "x"}])


@pytest.mark.parametrize("name", sorted(CHAT_TEMPLATES))
def test_trl_sees_the_end_of_turn_token_trained(fresh_tokenizer, name):
    from trl.chat_template_utils import is_chat_template_stop_token_trained

    assert is_chat_template_stop_token_trained(get_chat_template(fresh_tokenizer("llama"), name))


def test_detect_template_from_jinja_alone(fresh_tokenizer):
    tokenizer = fresh_tokenizer("gemma")
    tokenizer.chat_template = CHAT_TEMPLATES["gemma"].jinja
    assert detect_template(tokenizer).name == "gemma"
    mapped = get_chat_template(fresh_tokenizer("llama"), "phi-3", mapping={"user": "human"})
    del mapped.fasttune_template
    assert markers_for(mapped) == ("<|user|>\n", "<|assistant|>\n", ("<|end|>",))


def test_sync_model_eos(fresh_tokenizer):
    tokenizer = get_chat_template(fresh_tokenizer("llama"), "llama-3")
    model = SimpleNamespace(config=SimpleNamespace(eos_token_id=0), generation_config=SimpleNamespace(eos_token_id=0))
    sync_model_eos(model, tokenizer)
    assert model.config.eos_token_id == model.generation_config.eos_token_id == tokenizer.convert_tokens_to_ids(
        "<|eot_id|>")


def test_processor_gets_the_template_on_itself_and_its_tokenizer(fresh_tokenizer):
    processor = SimpleNamespace(tokenizer=fresh_tokenizer("gemma3"), chat_template=None)
    assert get_chat_template(processor, "gemma-3") is processor
    assert processor.chat_template == processor.tokenizer.chat_template == CHAT_TEMPLATES["gemma"].jinja
    assert processor.fasttune_template.eos_token == processor.tokenizer.eos_token == "<end_of_turn>"


def test_saved_tokenizer_keeps_template_and_eos_and_markers_are_detected(fresh_tokenizer, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = get_chat_template(fresh_tokenizer("llama"), "llama-3.1", mapping={"user": "human"})
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded.eos_token == "<|eot_id|>" and reloaded.chat_template == tokenizer.chat_template
    assert getattr(reloaded, "fasttune_template", None) is None  # the record lives on the Python object only
    assert markers_for(reloaded) == markers_for(tokenizer)
