"""Ollama Modelfiles: every table template renders through its Go TEMPLATE exactly as through its Jinja template."""

from __future__ import annotations

import pytest
from golang.go_ollama import CONVERSATIONS, parse_modelfile

from fasttune.data.chat import get_chat_template
from fasttune.data.gotemplate import GoTemplateError, render_go_template
from fasttune.data.ollama import (
    OllamaTemplateError,
    check_template,
    go_render_conversation,
    runtime_template,
    special_tokens_added,
)
from fasttune.data.templates import CHAT_TEMPLATES
from fasttune.export.ollama import resolve_chat_template, write_ollama_modelfile
from fasttune.tiny import build_tokenizer


@pytest.mark.parametrize("name", sorted(CHAT_TEMPLATES))
def test_modelfile_for_every_table_template(name, tiny_tokenizer, tmp_path):
    tokenizer = get_chat_template(tiny_tokenizer("llama"), name)
    bound = tokenizer.fasttune_template
    gguf = tmp_path / "model.Q8_0.gguf"
    gguf.write_bytes(b"GGUF")
    path = write_ollama_modelfile(tmp_path, gguf, tokenizer)
    parsed = parse_modelfile(path.read_text())
    assert parsed["from"] == "./model.Q8_0.gguf"
    adds_bos = special_tokens_added(tokenizer)[0]  # as the GGUF's add_bos_token will say
    assert parsed["template"] == runtime_template(bound, adds_bos).ollama_template
    assert parsed["system"] == (bound.default_system or "")
    assert bound.eos_token in parsed["stops"] and set(bound.stop_strings) <= set(parsed["stops"])
    assert "{EOS_TOKEN}" not in path.read_text()
    for messages in CONVERSATIONS:
        want = tokenizer.apply_chat_template(messages, tokenize=False,
                                             add_generation_prompt=messages[-1]["role"] != "assistant")
        system = next((m["content"] for m in messages if m["role"] == "system"), parsed["system"] or "")
        data = {"System": system, "Messages": [{"Role": m["role"], "Content": m["content"]} for m in messages]}
        got = (tokenizer.bos_token if adds_bos else "") + render_go_template(parsed["template"], data)
        assert got == want, f"{name}: Go rendering differs from Jinja\n go:    {got!r}\n jinja: {want!r}"


def test_broken_go_template_is_caught():
    chatml = CHAT_TEMPLATES["chatml"]
    broken = type(chatml)(**{**chatml.__dict__, "ollama_template": chatml.ollama_template.replace("<|im_end|>\n", "<|im_end|>", 1)})
    with pytest.raises(OllamaTemplateError, match="renders differently"):
        check_template(broken)


def test_unmapped_template_is_an_explicit_error(tiny_tokenizer, tmp_path):
    tokenizer = tiny_tokenizer("qwen2")
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(OllamaTemplateError, match="not in fasttune.s table.*cannot tell the turns apart.*get_chat_template"):
        write_ollama_modelfile(tmp_path / "Modelfile", tmp_path / "m.gguf", tokenizer)
    tokenizer.chat_template = None
    with pytest.raises(OllamaTemplateError, match="no chat template"):
        write_ollama_modelfile(tmp_path / "Modelfile", tmp_path / "m.gguf", tokenizer)
    assert not (tmp_path / "Modelfile").exists()


def test_template_derived_from_plain_chat_template_and_bound_to_eos(tiny_tokenizer):
    tokenizer = tiny_tokenizer("mistral")
    tokenizer.chat_template = CHAT_TEMPLATES["alpaca"].jinja  # set by hand: no fasttune_template attribute
    template = resolve_chat_template(tokenizer)
    assert template.name == "alpaca" and template.eos_token == "</s>" and template.stop_strings == ("</s>",)
    rendered = go_render_conversation(template, CONVERSATIONS[2])
    assert rendered.count("</s>") == 2


def test_go_renderer_subset():
    data = {"System": "", "Messages": [{"Role": "user", "Content": "x"}, {"Role": "assistant", "Content": "y"}],
            "N": 3}
    tpl = ('{{ $last := "" }}{{ range $i, $m := .Messages }}{{ $last = $m.Role }}[{{ $i }}:{{ $m.Content }}]'
           '{{ end }}{{ $last }}|{{ if .System }}S{{ else if (and (gt .N 2) (not .System)) }}N{{ else }}E{{ end }}'
           '|{{ with .Missing }}no{{ else }}none{{ end }}|{{ or .System "dflt" }}|{{ eq .N 1 3 }}|{{ len .Messages }}')
    assert render_go_template(tpl, data) == "[0:x][1:y]assistant|N|none|dflt|true|2"
    assert render_go_template("a  {{- .N -}}  b", data) == "a3b"
    assert render_go_template('{{ range .Messages }}{{ .Role }},{{ end }}', data) == "user,assistant,"
    with pytest.raises(GoTemplateError):
        render_go_template('{{ template "x" }}', data)
    with pytest.raises(GoTemplateError):
        render_go_template("{{ if .N }}unterminated", data)
    with pytest.raises(GoTemplateError, match="undeclared"):
        render_go_template("{{ $x = 1 }}", data)


CHATML_OWN_JINJA = (  # a model's own template, not fasttune's table: system block only when given, no default
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def test_modelfile_for_a_template_outside_the_table_is_converted(tiny_tokenizer, tmp_path):
    tokenizer = tiny_tokenizer("qwen2")
    tokenizer.chat_template = CHATML_OWN_JINJA
    tokenizer.eos_token = "<|im_end|>"
    path = write_ollama_modelfile(tmp_path, tmp_path / "model.Q8_0.gguf", tokenizer)
    parsed = parse_modelfile(path.read_text(encoding="utf-8"))
    assert parsed["stops"] == ["<|im_end|>"] and parsed["system"] == ""
    template = resolve_chat_template(tokenizer)
    for messages in CONVERSATIONS:
        jinja = tokenizer.apply_chat_template(messages, tokenize=False,
                                              add_generation_prompt=messages[-1]["role"] != "assistant")
        assert go_render_conversation(template, messages) == jinja


def test_unconvertible_template_says_why(tiny_tokenizer, tmp_path):
    tokenizer = tiny_tokenizer("qwen2")
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] | upper }}{% endfor %}"
    with pytest.raises(OllamaTemplateError, match="cannot convert .*is not rendered exactly once"):
        write_ollama_modelfile(tmp_path, tmp_path / "model.gguf", tokenizer)
    assert not (tmp_path / "Modelfile").exists()


SMOLLM2_JINJA = (  # SmolLM2-135M-Instruct's own template: a default system prompt, turns opened by its BOS token
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


@pytest.mark.parametrize("plain_adds_bos", [False, True])
def test_the_modelfile_writes_the_bos_itself_only_when_the_gguf_adds_none(plain_adds_bos, tmp_path):
    """SmolLM2's BOS is <|im_start|> and its GGUF says add_bos_token = false: the TEMPLATE began 'system\\n...' without
    it (before 2026-12-07), as if the runtime would add it. The Go rendering must equal the Jinja one, with the BOS
    put in front by the runtime only where the GGUF's add_bos_token is true. A tokenizer that adds a BOS to plain text
    under a chat template that renders none (True case) was trained on chats without it: the GGUF flag is false."""
    tokenizer = build_tokenizer("qwen2" if not plain_adds_bos else "llama")  # its own: the test changes it
    tokenizer.bos_token = "<|im_start|>" if not plain_adds_bos else tokenizer.bos_token
    tokenizer.eos_token = "<|im_end|>"
    assert (tokenizer("a").input_ids[0] == tokenizer.bos_token_id) is plain_adds_bos
    tokenizer.chat_template = SMOLLM2_JINJA
    assert special_tokens_added(tokenizer)[0] is False
    path = write_ollama_modelfile(tmp_path, tmp_path / "model.gguf", tokenizer)
    parsed = parse_modelfile(path.read_text())
    if not plain_adds_bos:
        assert parsed["template"].startswith("<|im_start|>system\n")
        # Unsloth's tokenizer._ollama_modelfile follows the same rule
        unsloth_style = get_chat_template(tokenizer, (SMOLLM2_JINJA, "<|im_end|>"))._ollama_modelfile
        assert parse_modelfile(unsloth_style)["template"] == parsed["template"]
    for messages in CONVERSATIONS:
        want = tokenizer.apply_chat_template(messages, tokenize=False,
                                             add_generation_prompt=messages[-1]["role"] != "assistant")
        system = next((m["content"] for m in messages if m["role"] == "system"), parsed["system"] or "")
        data = {"System": system, "Messages": [{"Role": m["role"], "Content": m["content"]} for m in messages]}
        got = render_go_template(parsed["template"], data)
        assert got == want, f"go:    {got!r}\njinja: {want!r}"
