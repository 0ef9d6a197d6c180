"""Which markers delimit assistant responses: from the tokenizer's fasttune template, from recognising its chat
template among fasttune's, or from the caller. ``tokenizer.fasttune_template`` wins when present.

Response masking (`fasttune.data.masking`) finds markers in the tokens' text. A marker holding a control token of the
tokenizer (``<|im_start|>assistant\n``) cannot be spelled by message text (`encode_chat` keeps such text plain), but a
marker the tokenizer writes as ordinary text (``[INST]`` on Llama-2 / Mistral v1 tokenizers, alpaca's
``### Response:``) can: message text that contains one would move the trained span. `plain_text_markers` lists those
markers and `plain_marker_problems` names each message that contains one, so such rows are refused by name.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from jinja2 import TemplateError

from fasttune.data.chat import template_of
from fasttune.data.spec import ChatTemplate
from fasttune.data.templates import CHAT_TEMPLATES

logger = logging.getLogger(__name__)

_PROBE = [{"role": "user", "content": "fasttune-probe-user"}, {"role": "assistant", "content": "fasttune-probe-reply"}]


def detect_template(tokenizer: Any) -> ChatTemplate | None:
    """The table template whose markers the tokenizer's chat template renders, preferring the longest markers."""
    jinja = getattr(tokenizer, "chat_template", None)
    if not isinstance(jinja, str):
        return None
    for template in CHAT_TEMPLATES.values():
        if template.jinja == jinja:
            return template.bind(tokenizer.eos_token or "", tokenizer.bos_token)
    try:
        text = tokenizer.apply_chat_template(_PROBE, tokenize=False)
    except TemplateError as error:  # a template that cannot render a plain user/assistant exchange is not ours
        logger.info("detect_template: the chat template cannot render a probe conversation (%s)", error)
        return None
    best = None
    for template in CHAT_TEMPLATES.values():
        bound = template.bind(tokenizer.eos_token or "", tokenizer.bos_token)
        user_at, reply_at = text.find("fasttune-probe-user"), text.find("fasttune-probe-reply")
        if 0 <= text.find(bound.instruction_part) < user_at < text.find(bound.response_part) < reply_at:
            if best is None or len(bound.response_part) > len(best.response_part):
                best = bound
    return best


def markers_for(
    tokenizer: Any,
    instruction_part: str | None = None,
    response_part: str | None = None,
    end_parts: Sequence[str] | None = None,
) -> tuple[str, str, tuple[str, ...]]:
    """``(instruction_part, response_part, end_parts)`` from the arguments or the tokenizer's template."""
    if (instruction_part is None) != (response_part is None):
        raise ValueError("instruction_part / response_part: give both or neither (neither: read from the template)")
    template = template_of(tokenizer) or detect_template(tokenizer)
    if response_part is None:
        if template is None or not template.response_part:
            raise ValueError(
                "train_on_responses_only: the tokenizer's chat template is not one of fasttune's, so the markers "
                "cannot be detected; pass instruction_part=... and response_part=... (e.g. '<|im_start|>user\\n', "
                "'<|im_start|>assistant\\n'), or call get_chat_template first"
            )
        instruction_part, response_part = template.instruction_part, template.response_part
    if end_parts is None:
        same = template is not None and template.response_part == response_part
        end_parts = template.end_parts if same else ()
    if not isinstance(response_part, str) or not response_part:
        raise ValueError(f"response_part: {response_part!r} must be a non-empty string")
    return instruction_part or "", response_part, tuple(end_parts)


def plain_text_markers(tokenizer: Any, markers: tuple[str, str, tuple[str, ...]]) -> tuple[str, ...]:
    """The markers (whitespace-trimmed) that hold none of ``tokenizer``'s added tokens: message text can spell them."""
    added = tokenizer.get_added_vocab()
    instruction_part, response_part, end_parts = markers
    found = [m.strip() for m in (instruction_part, response_part, *end_parts)
             if m.strip() and not any(token in m for token in added)]
    return tuple(dict.fromkeys(found))


def plain_marker_problems(messages: Sequence[Any], plain: Sequence[str]) -> list[str]:
    """One problem per message whose text contains a plain-text marker (see the module docstring)."""
    problems = []
    for i, message in enumerate(messages if plain else ()):
        content = message.get("content") if isinstance(message, dict) else None
        parts = [content] if isinstance(content, str) else [
            part["text"] for part in (content if isinstance(content, (list, tuple)) else ())
            if isinstance(part, dict) and isinstance(part.get("text"), str)]
        text = "".join(parts)
        hits = [marker for marker in plain if marker in text]
        if hits:
            problems.append(
                f"message {i} ({message.get('role')}): the text contains {hits[0]!r}, which this tokenizer writes as "
                "plain text, the same as the chat template's turn marker, so the trained span would move; rewrite "
                "that text (or use a tokenizer whose markers are control tokens) or drop the row")
    return problems
