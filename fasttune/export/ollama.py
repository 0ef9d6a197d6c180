"""Ollama Modelfiles whose TEMPLATE, stop tokens and eos come from the tokenizer's chat template.

    write_ollama_modelfile("out/Modelfile", "out/model.Q4_K_M.gguf", tokenizer)

The chat format is ``template=`` (a ``ChatTemplate`` or a table name), or ``tokenizer.fasttune_template`` (set by
``fasttune.get_chat_template`` / ``apply_chat_template``), or the table entry whose Jinja is exactly the tokenizer's
``chat_template``, or else the tokenizer's own Jinja template converted to a Go template by measuring it
(`fasttune.data.infer_template`, e.g. Qwen3's). When none works the ``OllamaTemplateError`` says exactly why and what
to do: a Modelfile without the right TEMPLATE/stop is the classic "the model never stops" bug, so fasttune never
writes one by guesswork.

Before writing, the Go TEMPLATE is rendered (``gotemplate``) for sample conversations and compared with the Jinja
rendering; a mismatch is an error.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .atomic import atomic_file
from .gotemplate import render_go_template

SAMPLE_CONVERSATIONS: tuple[tuple[dict[str, str], ...], ...] = (
    ({"role": "user", "content": "What is 2+2?"},),
    ({"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Name a colour."}),
    ({"role": "user", "content": "Say yes"}, {"role": "assistant", "content": "yes"}),
)


class OllamaTemplateError(ValueError):
    """No Ollama template can be derived for this tokenizer, or it does not match the Jinja template."""


def resolve_chat_template(tokenizer: Any = None, template: Any = None) -> Any:
    """The bound ``ChatTemplate`` to export (see the module docstring for the order tried)."""
    from fasttune.data.templates import CHAT_TEMPLATES, resolve_template

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
    from fasttune.data.infer_template import TemplateInferenceError, infer_template

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


def go_render_conversation(template: Any, messages: list[dict[str, str]]) -> str:
    """Render ``messages`` with the template's Go TEMPLATE the way Ollama fills it (System, Messages)."""
    system = next((m["content"] for m in messages if m["role"] == "system"), None)
    if system is None:
        system = template.default_system or ""
    data = {"System": system, "Messages": [{"Role": m["role"], "Content": m["content"], "Thinking": ""}
                                           for m in messages], "IsThinkSet": False, "Think": False}
    return render_go_template(template.ollama_template, data)


def jinja_render_conversation(template: Any, messages: list[dict[str, str]]) -> str:
    from fasttune.data.chat import render

    return render(template, list(messages), add_generation_prompt=messages[-1]["role"] != "assistant",
                  eos_token=template.eos_token, bos_token=template.bos_token)


def check_template(template: Any, conversations: Any = SAMPLE_CONVERSATIONS) -> None:
    """Raise ``OllamaTemplateError`` when Go and Jinja renderings differ (Jinja = bos + Go, by the table contract).

    A conversation with a system message is skipped when the Jinja template refuses system messages (a format
    without a system slot, e.g. ``apply_chat_template`` with no ``{SYSTEM}``): there is nothing trained to match.
    """
    from jinja2 import TemplateError

    for messages in conversations:
        try:
            jinja = jinja_render_conversation(template, list(messages))
        except TemplateError:
            if messages[0]["role"] != "system":
                raise
            continue
        go = template.bos_token + go_render_conversation(template, list(messages))
        if jinja != go:
            at = next((i for i, (a, b) in enumerate(zip(jinja, go)) if a != b), min(len(jinja), len(go)))
            raise OllamaTemplateError(
                f"template {template.name!r}: the Ollama TEMPLATE renders differently from the Jinja template at "
                f"character {at}: jinja {jinja[max(0, at - 20):at + 30]!r} vs go {go[max(0, at - 20):at + 30]!r}"
            )


def _quote(text: str) -> str:
    if '"""' in text:
        raise OllamaTemplateError('a Modelfile value cannot contain """')
    return f'"""{text}"""'


def modelfile_text(gguf_path: str | os.PathLike, template: Any, parameters: dict[str, Any] | None = None,
                   relative_to: Path | None = None) -> str:
    """The Modelfile for ``gguf_path``: FROM, TEMPLATE, SYSTEM (default prompt), one PARAMETER stop per stop string
    (the eos/end-of-turn token included) and any extra ``parameters`` (e.g. {"temperature": 0.7})."""
    path = Path(gguf_path)
    source = f"./{path.name}" if relative_to is not None and path.parent.resolve() == relative_to.resolve() else str(path)
    lines = [f"FROM {source}", f"TEMPLATE {_quote(template.ollama_template)}"]
    if template.default_system:
        lines.append(f"SYSTEM {_quote(template.default_system)}")
    for stop in dict.fromkeys((template.eos_token, *template.stop_strings)):
        lines.append(f"PARAMETER stop {_go_string(stop)}")
    for key, value in (parameters or {}).items():
        lines.append(f"PARAMETER {key} {value}")
    return "\n".join(lines) + "\n"


def _go_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


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
    if check:
        check_template(chat)
    text = modelfile_text(gguf_path, chat, parameters, relative_to=target.parent)
    with atomic_file(target) as scratch:
        scratch.write_text(text, encoding="utf-8")
    return target
