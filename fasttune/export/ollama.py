"""Ollama Modelfiles whose TEMPLATE, stop tokens and eos come from the tokenizer's chat template.

    write_ollama_modelfile("out/Modelfile", "out/model.Q4_K_M.gguf", tokenizer)

The chat format is ``template=`` (a ``ChatTemplate`` or a table name), or ``tokenizer.fasttune_template`` (set by
``fasttune.get_chat_template`` / ``apply_chat_template``), or the table entry whose Jinja is exactly the tokenizer's
``chat_template``, or else the tokenizer's own Jinja template converted to a Go template by measuring it
(`fasttune.data.infer_template`, e.g. Qwen3's). When none works the ``OllamaTemplateError`` says exactly why and what
to do: a Modelfile without the right TEMPLATE/stop is the classic "the model never stops" bug, so fasttune never
writes one by guesswork.

Before writing, the Go TEMPLATE is checked against the Jinja template on sample conversations
(`fasttune.data.ollama.check_template`); a mismatch is an error.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from fasttune.data.infer_template import TemplateInferenceError, infer_template
from fasttune.data.ollama import (
    OllamaTemplateError,
    check_template,
    modelfile_text,
    runtime_template,
    special_tokens_added,
)
from fasttune.data.templates import CHAT_TEMPLATES, resolve_template

from .atomic import atomic_file


def resolve_chat_template(tokenizer: Any = None, template: Any = None) -> Any:
    """The bound ``ChatTemplate`` to export (see the module docstring for the order tried)."""
    if isinstance(template, str):
        template = resolve_template(template)
    if template is None:
        template = getattr(tokenizer, "fasttune_template", None)
    if template is None and tokenizer is not None:
        jinja = getattr(tokenizer, "chat_template", None)
        template = next((t for t in CHAT_TEMPLATES.values() if jinja and t.jinja == jinja), None)
        if template is None:
            template = _converted(tokenizer, jinja, sorted(CHAT_TEMPLATES))
    if template is None:
        raise OllamaTemplateError("write_ollama_modelfile: pass a tokenizer or template='<name>'")
    if not template.is_bound:
        if tokenizer is None or not tokenizer.eos_token:
            raise OllamaTemplateError(f"template {template.name!r} closes turns with the tokenizer's EOS; "
                                      "pass the tokenizer so it can be filled in")
        template = template.bind(tokenizer.eos_token, tokenizer.bos_token)
    if not template.ollama_template:
        raise OllamaTemplateError(f"template {template.name!r} has no Ollama (Go) template in the table")
    return template


def _converted(tokenizer: Any, jinja: Any, names: list[str]) -> Any:
    """The tokenizer's own Jinja template converted to a Go template (`fasttune.data.infer_template`), or an
    ``OllamaTemplateError`` saying exactly why it cannot be."""
    advice = (f"Call fasttune.get_chat_template(tokenizer, '<name>') before training/export, or pass template='<name>'; "
              f"known names: {names}")
    if not isinstance(jinja, str) or not jinja:
        raise OllamaTemplateError("cannot write an Ollama TEMPLATE for this tokenizer: it has no chat template, so the "
                                  "turn format and stop tokens are unknown. " + advice)
    if not tokenizer.eos_token:
        raise OllamaTemplateError("cannot write an Ollama TEMPLATE: the tokenizer has no eos_token to stop on. " + advice)
    try:
        return infer_template(jinja, tokenizer.eos_token, tokenizer.bos_token,
                              name=getattr(tokenizer, "name_or_path", "") or "model")
    except TemplateInferenceError as error:
        raise OllamaTemplateError(f"cannot convert this tokenizer's own chat template (not in fasttune's table) to an "
                                  f"Ollama TEMPLATE: {error}. {advice}") from error


def write_ollama_modelfile(path: str | os.PathLike, gguf_path: str | os.PathLike, tokenizer: Any = None,
                           template: Any = None, parameters: dict[str, Any] | None = None,
                           check: bool = True) -> Path:
    """Write a Modelfile for ``gguf_path`` at ``path`` (a folder gets ``Modelfile`` inside); returns its path.

    ``check=True`` first verifies the Go TEMPLATE against the Jinja template on sample conversations.
    """
    target = Path(path)
    if target.is_dir():
        target = target / "Modelfile"
    chat = resolve_chat_template(tokenizer, template)
    adds_bos = special_tokens_added(tokenizer)[0] if tokenizer is not None else True  # as the GGUF says
    if check:
        check_template(chat, adds_bos=adds_bos)
    text = modelfile_text(gguf_path, runtime_template(chat, adds_bos), parameters, relative_to=target.parent)
    with atomic_file(target) as scratch:
        scratch.write_text(text, encoding="utf-8")
    return target
