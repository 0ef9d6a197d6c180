"""Render a conversation with a chat template to text, no tokenizer needed (the bottom of the data layer)."""

from __future__ import annotations

from typing import Any

from transformers.utils.chat_template_utils import render_jinja_template

from fasttune.data.spec import ChatTemplate
from fasttune.data.templates import resolve_template
from fasttune.data.validate import validate_conversation


def render(
    template: ChatTemplate | str,
    messages: list[dict[str, Any]],
    add_generation_prompt: bool = False,
    eos_token: str | None = None,
    bos_token: str | None = None,
    **kwargs: Any,
) -> str:
    """Render ``messages`` with a template (no tokenizer needed); ``eos_token``/``bos_token`` feed placeholders.

    The conversation is validated first (`validate_conversation`), so bad input raises a ``ValueError`` that names
    the message and the problem instead of an error from inside Jinja.
    """
    validate_conversation(messages, require_assistant=False)
    if isinstance(template, str):
        template = resolve_template(template)
    variables = {k: v for k, v in (("eos_token", eos_token), ("bos_token", bos_token)) if v is not None}
    rendered, _ = render_jinja_template(
        conversations=[messages], chat_template=template.jinja, add_generation_prompt=add_generation_prompt,
        **variables, **kwargs,
    )
    return rendered[0]


__all__ = ["render"]
