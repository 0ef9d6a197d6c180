"""The Modelfile fasttune writes, rendered by Go's own text/template as Ollama fills it, feeds the model exactly the
tokens it was trained on: for every template in the table, system prompt given or not, with the BOS put in front by
the runtime only where the GGUF's ``add_bos_token`` (from the tokenizer) is true.

The reference is Go (tests/golang/ollama_render.go, built with Debian's golang-go), not fasttune's Python renderer:
that renderer (``fasttune.data.gotemplate``, used at export time to check the TEMPLATE) is itself checked against Go
here.
"""

from __future__ import annotations

import pytest
from golang.go_ollama import check_modelfile

from fasttune.data.chat import get_chat_template
from fasttune.data.templates import CHAT_TEMPLATES
from fasttune.export.ollama import write_ollama_modelfile
from fasttune.tiny import build_tokenizer


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


def test_gpt_oss_modelfile_matches_training_in_go(go_ollama, tmp_path):
    """gpt-oss's tokenizer (no BOS added, harmony markers) with its harmony template, as save_pretrained_gguf writes
    it beside a gpt-oss GGUF: Ollama's prompt is the training prompt, token for token."""
    tokenizer = get_chat_template(build_tokenizer("gpt_oss"), "gpt-oss")
    path = write_ollama_modelfile(tmp_path, tmp_path / "model.MXFP4_MOE.gguf", tokenizer)
    assert check_modelfile(go_ollama, tokenizer, path.read_text()) >= 2
