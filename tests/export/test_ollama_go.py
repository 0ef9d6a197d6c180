"""The Modelfile fasttune writes, rendered by Go's own text/template as Ollama fills it, feeds the model exactly the
tokens it was trained on: for every template in the table, system prompt given or not, with the BOS put in front by
the runtime only where the GGUF's ``add_bos_token`` (from the tokenizer) is true.

The reference is Go (tests/golang/ollama_render.go, built with Debian's golang-go), not fasttune's Python renderer:
that renderer (``fasttune.data.gotemplate``, used at export time to check the TEMPLATE) is itself checked against Go
here.
"""

from __future__ import annotations

import re

import pytest

from fasttune.data.chat import get_chat_template
from fasttune.data.encode import encode_chat
from fasttune.data.gotemplate import render_go_template
from fasttune.data.ollama import special_tokens_added
from fasttune.data.templates import CHAT_TEMPLATES
from fasttune.export.ollama import write_ollama_modelfile
from fasttune.tiny import build_tokenizer

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Capital of Italy?"},
     {"role": "assistant", "content": "Rome"}, {"role": "user", "content": "And of Spain?"}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"},
     {"role": "assistant", "content": "d"}],
    [{"role": "system", "content": "Be brief.\nVery brief."}, {"role": "user", "content": "Hi"}],
]


def parse_modelfile(text: str) -> dict:
    template = re.search(r'^TEMPLATE """(.*?)"""$', text, re.S | re.M)
    system = re.search(r'^SYSTEM """(.*?)"""$', text, re.S | re.M)
    return {"template": template[1], "system": system[1] if system else ""}


def ollama_ids(tokenizer, text: str, adds_bos: bool) -> list[int]:
    """The ids llama.cpp feeds for a prompt Ollama rendered: special tokens parsed, the BOS added when the GGUF says."""
    ids = tokenizer(text, add_special_tokens=False).input_ids
    return ([tokenizer.bos_token_id] if adds_bos else []) + ids


def ollama_data(system: str, messages: list[dict]) -> dict:
    """What Ollama's chat handler passes the template (as ollama_render.go builds it, for the Python renderer)."""
    if system and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system}, *messages]
    collated: list[dict] = []
    for m in messages:
        if collated and collated[-1]["Role"] == m["role"]:
            collated[-1]["Content"] += "\n\n" + m["content"]
        else:
            collated.append({"Role": m["role"], "Content": m["content"], "Thinking": ""})
    return {"System": "\n\n".join(m["content"] for m in messages if m["role"] == "system"), "Messages": collated,
            "Tools": None, "Response": "", "Think": False, "IsThinkSet": False}


def check_modelfile(go, tokenizer, modelfile: str, conversations=CONVERSATIONS, adds_bos: bool | None = None) -> int:
    """Render each conversation with Go as Ollama would and compare with the training ids; returns cases checked."""
    parsed = parse_modelfile(modelfile)
    if adds_bos is None:
        adds_bos = special_tokens_added(tokenizer)[0]
    cases, wants, conversations_run = [], [], []
    for messages in conversations:
        generation = messages[-1]["role"] != "assistant"
        try:
            want = encode_chat(tokenizer, messages, add_generation_prompt=generation)
        except Exception as error:  # noqa: BLE001 - a template that refuses system messages: nothing to match
            if messages[0]["role"] == "system" and "system" in str(error).lower():
                continue
            raise
        cases.append({"template": parsed["template"], "system": parsed["system"], "messages": messages})
        wants.append(want)
        conversations_run.append(messages)
    texts = go.render(cases)
    for messages, text, want in zip(conversations_run, texts, wants):
        got = ollama_ids(tokenizer, text, adds_bos)
        assert got == want, (f"Ollama (Go) prompt differs from training for {messages}\n"
                             f" go:       {tokenizer.decode(got)!r}\n training: {tokenizer.decode(want)!r}")
        # fasttune's own Go renderer (used to check templates at export), given the data Ollama builds, agrees
        assert render_go_template(parsed["template"], ollama_data(parsed["system"], messages)) == text
    return len(cases)


@pytest.mark.parametrize("family", ["llama", "qwen2"], ids=["bos-added", "no-bos"])
@pytest.mark.parametrize("name", sorted(CHAT_TEMPLATES))
def test_table_modelfile_matches_training_in_go(name, family, go_ollama, tmp_path):
    tokenizer = get_chat_template(build_tokenizer(family), name)
    path = write_ollama_modelfile(tmp_path, tmp_path / "model.Q8_0.gguf", tokenizer)
    assert check_modelfile(go_ollama, tokenizer, path.read_text()) >= 2


def test_go_reference_catches_a_broken_template(go_ollama, tmp_path):
    tokenizer = get_chat_template(build_tokenizer("llama"), "chatml")
    text = write_ollama_modelfile(tmp_path, tmp_path / "model.gguf", tokenizer).read_text()
    broken = text.replace("<|im_end|>\n", "<|im_end|>", 1)
    assert broken != text
    with pytest.raises(AssertionError, match="differs from training"):
        check_modelfile(go_ollama, tokenizer, broken)


def test_go_reference_shows_ollamas_system_handling(go_ollama):
    """Ollama puts the Modelfile SYSTEM in front as a system message and merges consecutive same-role messages: a
    template that prints .System and then every message would show the system prompt twice."""
    naive = "{{ .System }}|{{ range .Messages }}{{ .Role }}:{{ .Content }};{{ end }}"
    out = go_ollama.render([{"template": naive, "system": "S", "messages": [
        {"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}])
    assert out == ["S|system:S;user:a\n\nb;"]
