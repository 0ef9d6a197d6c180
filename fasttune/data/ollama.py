"""Ollama's side of a chat template: its Go TEMPLATE rendered, checked against the Jinja one, and the Modelfile text.

The Go TEMPLATE is rendered with fasttune's renderer (`fasttune.data.gotemplate`) for sample conversations and compared
with the Jinja rendering; a mismatch is an ``OllamaTemplateError``. Writing a Modelfile file next to a GGUF is
`fasttune.export.ollama.write_ollama_modelfile`; ``tokenizer._ollama_modelfile`` (`fasttune.data.chat`) uses
:func:`modelfile_text` here.

The table's Go templates leave the BOS out (Jinja = bos + Go): llama.cpp, under Ollama, puts the BOS token before the
prompt when the GGUF says ``tokenizer.ggml.add_bos_token``, which fasttune writes from the tokenizer
(:func:`special_tokens_added`). Where the tokenizer adds no BOS (SmolLM2: its BOS is ``<|im_start|>``, the opening of
every turn), nothing would put it back, so :func:`runtime_template` writes the BOS text into the TEMPLATE itself.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any

from jinja2 import TemplateError

from fasttune.data.gotemplate import render_go_template
from fasttune.data.render import render

logger = logging.getLogger("fasttune")

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


def special_tokens_added(tokenizer: Any) -> tuple[bool, bool]:
    """Whether the runtime must put ``bos`` first / ``eos`` last (GGUF's ``add_bos_token`` / ``add_eos_token``).

    As the tokenizer does on plain text, with one exception: a tokenizer whose chat template renders no BOS (ChatML on
    a Llama-3 tokenizer, say) was trained on chats without it, and llama.cpp/Ollama would put one in front of every
    chat prompt, where a Modelfile TEMPLATE cannot take it back; its BOS flag is false. (Raw completions in llama.cpp
    then start without the BOS too.)
    """
    ids = tokenizer("a").input_ids
    bos = tokenizer.bos_token_id is not None and len(ids) > 1 and ids[0] == tokenizer.bos_token_id
    eos = tokenizer.eos_token_id is not None and len(ids) > 1 and ids[-1] == tokenizer.eos_token_id
    if bos and _chat_renders_without_bos(tokenizer):
        bos = False
    return bos, eos


def _chat_renders_without_bos(tokenizer: Any) -> bool:
    template = getattr(tokenizer, "chat_template", None)
    if not isinstance(template, str) or not template or not tokenizer.bos_token:
        return False
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "a"}], tokenize=False,
                                             add_generation_prompt=True)
    except TemplateError as error:  # the GGUF flag then follows plain text; the Modelfile check reports the template
        logger.warning("fasttune: the chat template cannot render a one-message chat (%s); the GGUF's BOS flag "
                       "follows the tokenizer on plain text", error)
        return False
    return not text.startswith(tokenizer.bos_token)


def runtime_template(template: Any, adds_bos: bool) -> Any:
    """``template`` as Ollama must hold it: the BOS text written into the Go TEMPLATE when the runtime adds none."""
    if adds_bos or not template.bos_token:
        return template
    return dataclasses.replace(template, ollama_template=template.bos_token + template.ollama_template)


def check_template(template: Any, conversations: Any = SAMPLE_CONVERSATIONS, adds_bos: bool = True) -> None:
    """Raise ``OllamaTemplateError`` when Go and Jinja renderings differ (Jinja = bos + Go, by the table contract;
    with ``adds_bos=False`` the Go TEMPLATE holds the BOS itself, :func:`runtime_template`, and Jinja = Go).

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
        go = (template.bos_token if adds_bos else "") + go_render_conversation(runtime_template(template, adds_bos),
                                                                               list(messages))
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
