"""An Ollama Go template for a chat template fasttune's table does not know (a model's own Jinja, e.g. Qwen3's).

Jinja chat templates are programs; Ollama templates are a smaller language. Instead of translating the program, the
template is *measured*: it renders probe conversations whose contents are unique marker strings, and the text
around the markers gives each piece of a turn-based format:

    head (BOS, default system block)  user: prefix + content + suffix  assistant: prefix + content + end
    generation prompt                 system message: block_prefix + content + block_suffix, before the turns

The assistant prefix may differ for the conversation's last message (Qwen3 writes an empty ``<think>`` block there);
the Go template then tests ``eq (len (slice $.Messages $i)) 1``. The Go template built from these pieces is then
checked by rendering sample conversations with both templates (`fasttune.export.ollama.check_template`); any
difference, or a shape outside this model (a system prompt folded into a user turn, a template that cannot render a
plain exchange), is a `TemplateInferenceError` that says exactly what differs, so the caller can report it.
"""

from __future__ import annotations

from typing import Any

from jinja2 import TemplateError
from transformers.utils.chat_template_utils import render_jinja_template

from fasttune.data.ollama import SAMPLE_CONVERSATIONS, OllamaTemplateError, check_template
from fasttune.data.spec import ChatTemplate

_S, _U1, _A1, _U2, _A2 = (f"fasttune-probe-{k}" for k in ("system", "user-1", "reply-1", "user-2", "reply-2"))


class TemplateInferenceError(ValueError):
    """The Jinja template does not have a shape an Ollama Go template can reproduce; the message says why."""


def _user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def _assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def _renderer(jinja: str, eos_token: str, bos_token: str):
    def render(messages: list[dict[str, str]], generation: bool) -> str:
        try:
            text, _ = render_jinja_template(conversations=[messages], chat_template=jinja,
                                            add_generation_prompt=generation, eos_token=eos_token, bos_token=bos_token)
        except TemplateError as error:
            raise TemplateInferenceError(f"the template cannot render the probe {messages}: {error}") from error
        return text[0]
    return render


def _between(text: str, start: str, end: str | None) -> str:
    """The text after marker ``start`` and before marker ``end`` (to the end when None)."""
    at = text.index(start) + len(start)
    return text[at:] if end is None else text[at:text.index(end, at)]


def _require(condition: bool, reason: str) -> None:
    if not condition:
        raise TemplateInferenceError(reason)


def _turn_parts(render: Any) -> dict[str, str]:
    """head+user prefix, user suffix, generation prompt, assistant prefixes (middle, last) and end."""
    one, one_gen = render([_user(_U1)], False), render([_user(_U1)], True)
    conv = render([_user(_U1), _assistant(_A1), _user(_U2), _assistant(_A2)], False)
    for marker in (_U1, _A1, _U2, _A2):
        _require(conv.count(marker) == 1, f"message text {marker!r} is not rendered exactly once (it is changed or "
                                          "dropped), so the turns cannot be located")
    head_user = one[:one.index(_U1)]
    user_suffix = _between(one, _U1, None)
    _require(one_gen.startswith(one), "adding the generation prompt changes the text before it")
    _require(conv.startswith(head_user), "the text before the first user message depends on later messages")
    end = _between(conv, _A2, None)
    mid_gap, user_gap, last_gap = _between(conv, _U1, _A1), _between(conv, _A1, _U2), _between(conv, _U2, _A2)
    _require(mid_gap.startswith(user_suffix) and last_gap.startswith(user_suffix),
             f"a user turn ends differently alone ({user_suffix!r}) and followed by an answer ({mid_gap!r})")
    _require(user_gap.startswith(end), f"an assistant turn ends differently in the middle ({user_gap!r}) and at the "
                                       f"end ({end!r}) of a conversation")
    _require(mid_gap.strip() != "", "the template writes nothing between a user message and its answer, so a "
                                    "model (or Ollama) cannot tell the turns apart")
    user_prefix = user_gap[len(end):]
    _require(head_user.endswith(user_prefix), f"the first user turn opens differently ({head_user!r}) from later ones "
                                              f"({user_prefix!r})")
    return {"head": head_user[:len(head_user) - len(user_prefix)], "user_prefix": user_prefix,
            "user_suffix": user_suffix, "generation": one_gen[len(one):], "assistant_prefix": mid_gap[len(user_suffix):],
            "assistant_last": last_gap[len(user_suffix):], "assistant_end": end}


def _system_parts(render: Any, parts: dict[str, str]) -> tuple[str, str, str | None] | None:
    """``(block_prefix, block_suffix, default_system)``, or None when the template renders no system message."""
    try:
        text = render([{"role": "system", "content": _S}, _user(_U1)], True)
    except TemplateInferenceError:
        return None
    before = text[:text.index(_U1)]
    _require(_S in before, "the system message is not rendered before the first user message")
    _require(before.endswith(parts["user_prefix"]) and _S in before[:len(before) - len(parts["user_prefix"])],
             "the system message is written inside the first user turn (folded), which this conversion does not "
             "model; pass a table template with get_chat_template (e.g. 'gemma-3')")
    block = before[:len(before) - len(parts["user_prefix"])]
    prefix, suffix = block.split(_S, 1)
    head = parts["head"]
    if len(head) >= len(prefix) + len(suffix) and head.startswith(prefix) and head.endswith(suffix):
        return prefix, suffix, head[len(prefix):len(head) - len(suffix)]
    _require(prefix.startswith(head), f"without a system message the head is {head!r}, which is neither the system "
                                      f"block ({prefix!r}...{suffix!r}) with a default prompt nor a prefix of it")
    return prefix, suffix, None


def _go(parts: dict[str, str], system: tuple[str, str, str | None] | None, bos: str) -> str:
    head = parts["head"]
    if system is not None:
        prefix, suffix, default = system
        block = prefix[len(head):] + "{{ $.System }}" + suffix
        head = prefix + "{{ $.System }}" + suffix if default is not None else head + "{{ if $.System }}" + block + \
            "{{ end }}"
    head = head[len(bos):]
    assistant = parts["assistant_prefix"]
    if parts["assistant_last"] != assistant:
        assistant = ("{{ if eq (len (slice $.Messages $i)) 1 }}" + parts["assistant_last"] + "{{ else }}" + assistant
                     + "{{ end }}")
    return (head + '{{ $lastRole := "" }}{{ range $i, $m := $.Messages }}{{ $lastRole = $m.Role }}'
            '{{ if eq $m.Role "user" }}' + parts["user_prefix"] + "{{ $m.Content }}" + parts["user_suffix"]
            + '{{ else if eq $m.Role "assistant" }}' + assistant + "{{ $m.Content }}" + parts["assistant_end"]
            + '{{ end }}{{ end }}{{ if ne $lastRole "assistant" }}' + parts["generation"] + "{{ end }}")


def infer_template(jinja: str, eos_token: str, bos_token: str | None = None, name: str = "model") -> ChatTemplate:
    """A `ChatTemplate` holding ``jinja`` and an equivalent Ollama template, checked on sample conversations."""

    render = _renderer(jinja, eos_token, bos_token or "")
    parts = _turn_parts(render)
    system = _system_parts(render, parts)
    bos = bos_token if bos_token and parts["head"].startswith(bos_token) else ""
    go = _go(parts, system, bos)
    if "{{" in "".join(parts.values()).replace("{{ $.System }}", ""):
        raise TemplateInferenceError("the template writes '{{' as text, which Ollama would read as an action")
    template = ChatTemplate(
        name=name, jinja=jinja, eos_token=eos_token,
        stop_strings=tuple(s for s in dict.fromkeys((eos_token, parts["assistant_end"].strip())) if s),
        instruction_part=parts["user_prefix"], response_part=parts["assistant_prefix"], ollama_template=go,
        default_system=None if system is None else system[2], bos_token=bos,
        source="converted from the tokenizer's own Jinja chat template",
    )
    samples = [c for c in SAMPLE_CONVERSATIONS if system is not None or c[0]["role"] != "system"]
    samples.append(({"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
                    {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Bye."}))
    try:
        check_template(template, samples)
    except OllamaTemplateError as error:
        raise TemplateInferenceError(f"the Go template built from the probes does not match: {error}") from error
    return template


__all__ = ["TemplateInferenceError", "infer_template"]
