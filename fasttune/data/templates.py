"""The chat-template table: `ChatTemplate` entries by name, and `resolve_template(name)`.

Every entry renders its model family's published prompt format (see each entry's ``source``); the rows live in
``fasttune.data.formats`` and the Jinja/Go rendering contract is described in ``fasttune.data.spec``.
"""

from __future__ import annotations

from fasttune.data.formats.reasoning import GPT_OSS_DEFAULT_DATE, REASONING_TEMPLATES
from fasttune.data.formats.table import TURN_FORMATS
from fasttune.data.formats.turns import build
from fasttune.data.spec import BOS_PLACEHOLDER, EOS_PLACEHOLDER, ChatTemplate

__all__ = [
    "BOS_PLACEHOLDER",
    "CHAT_TEMPLATES",
    "EOS_PLACEHOLDER",
    "GPT_OSS_DEFAULT_DATE",
    "ChatTemplate",
    "resolve_template",
    "template_names",
]

CHAT_TEMPLATES: dict[str, ChatTemplate] = {
    t.name: t for t in (*(build(fmt) for fmt in TURN_FORMATS), *REASONING_TEMPLATES)
}

_ALIASES: dict[str, str] = {}
for _template in CHAT_TEMPLATES.values():
    for _alias in (_template.name, *_template.aliases):
        _key = _alias.lower()
        if _key in _ALIASES:
            raise RuntimeError(f"chat template name {_alias!r} is used by {_ALIASES[_key]!r} and {_template.name!r}")
        _ALIASES[_key] = _template.name


def template_names(include_aliases: bool = True) -> list[str]:
    """All names `resolve_template` accepts (canonical names first)."""
    names = list(CHAT_TEMPLATES)
    if include_aliases:
        names += sorted(a for t in CHAT_TEMPLATES.values() for a in t.aliases)
    return names


def resolve_template(name: str) -> ChatTemplate:
    """The `ChatTemplate` called ``name`` or one of its aliases (case-insensitive)."""
    if not isinstance(name, str):
        raise TypeError(f"chat_template: expected a template name (str), got {type(name).__name__}")
    key = name.strip().lower()
    if key not in _ALIASES:
        raise ValueError(f"chat_template: {name!r} is not a known template; choose one of {template_names()}")
    return CHAT_TEMPLATES[_ALIASES[key]]
