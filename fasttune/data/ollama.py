"""Ollama's side of a chat template: its Go TEMPLATE rendered, checked against the Jinja one, and the Modelfile text.

The Go TEMPLATE is rendered with fasttune's renderer (`fasttune.data.gotemplate`) for sample conversations and compared
with the Jinja rendering; a mismatch is an ``OllamaTemplateError``. Writing a Modelfile file next to a GGUF is
`fasttune.export.ollama.write_ollama_modelfile`; ``tokenizer._ollama_modelfile`` (`fasttune.data.chat`) uses
:func:`modelfile_text` here.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from jinja2 import TemplateError

from fasttune.data.gotemplate import render_go_template
from fasttune.data.render import render

SAMPLE_CONVERSATIONS: tuple[tuple[dict[str, str], ...], ...] = (
    ({"role": "user", "content": "What is 2+2?"},),
    ({"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Name a colour."}),
    ({"role": "user", "content": "Say yes"}, {"role": "assistant", "content": "yes"}),
)


class OllamaTemplateError(ValueError):
    """No Ollama template can be derived for this tokenizer, or it does not match the Jinja template."""


def go_render_conversation(template: Any, messages: list[dict[str, str]]) -> str:
    """Render ``messages`` with the template's Go TEMPLATE the way Ollama fills it (System, Messages)."""
    system = next((m["content"] for m in messages if m["role"] == "system"), None)
    if system is None:
        system = template.default_system or ""
    data = {"System": system, "Messages": [{"Role": m["role"], "Content": m["content"], "Thinking": ""}
                                           for m in messages], "IsThinkSet": False, "Think": False}
    return render_go_template(template.ollama_template, data)


def jinja_render_conversation(template: Any, messages: list[dict[str, str]]) -> str:
    return render(template, list(messages), add_generation_prompt=messages[-1]["role"] != "assistant",
                  eos_token=template.eos_token, bos_token=template.bos_token)


def check_template(template: Any, conversations: Any = SAMPLE_CONVERSATIONS) -> None:
    """Raise ``OllamaTemplateError`` when Go and Jinja renderings differ (Jinja = bos + Go, by the table contract).

    A conversation with a system message is skipped when the Jinja template refuses system messages (a format
    without a system slot, e.g. ``apply_chat_template`` with no ``{SYSTEM}``): there is nothing trained to match.
    """
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
