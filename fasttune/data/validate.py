"""Validation of one conversation (role/content messages) before any Jinja rendering: every problem, clearly."""

from __future__ import annotations

from typing import Any

from fasttune.data.spec import ROLES


def conversation_problems(messages: Any, require_assistant: bool = True) -> list[str]:
    """Why ``messages`` cannot be rendered or trained on (empty list: it is fine)."""
    if not isinstance(messages, (list, tuple)) or not messages:
        return [f"the conversation must be a non-empty list of messages, got {_describe(messages)}"]
    problems = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            problems.append(f"message {i} must be a dict with 'role' and 'content', got {_describe(message)}")
            continue
        if "role" not in message and "from" in message:
            problems.append(f"message {i} uses ShareGPT keys (from/value); run standardize_sharegpt first")
            continue
        role = message.get("role")
        if role not in ROLES:
            problems.append(f"message {i}: unknown role {role!r}; allowed roles are {list(ROLES)}")
        elif role == "system" and i != 0:
            problems.append(f"message {i}: a system message is only allowed as the first message")
        try:
            text = content_text(message.get("content"), f"message {i} ({role})")
        except ValueError as error:
            problems.append(str(error))
            continue
        if not text.strip():
            problems.append(f"message {i} ({role}): content is empty")
    if require_assistant and not any(isinstance(m, dict) and m.get("role") == "assistant" for m in messages):
        problems.append("the conversation has no assistant turn, so nothing would be trained")
    return problems


def content_text(content: Any, where: str) -> str:
    """The text of one message's content: a string as is, or the concatenation of a list of text parts.

    The models' own templates (Gemma 3, Qwen, Llama 4...) accept ``[{"type": "text", "text": ...}, ...]`` and join
    the text parts without a separator; fasttune's text templates do the same. A non-text part (an image) cannot be
    rendered by a text-only template, so it is a ``ValueError`` naming the message (``where``) and the part.
    """
    if isinstance(content, str):
        return content
    if not isinstance(content, (list, tuple)) or not content:
        raise ValueError(f"{where}: content must be a string or a list of text parts, got {_describe(content)}")
    texts = []
    for j, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            kind = f"of type {part.get('type')!r}" if isinstance(part, dict) else _describe(part)
            raise ValueError(
                f"{where}: content part {j} is {kind}; a text-only chat template renders parts "
                '{"type": "text", "text": <string>} only (use the model\'s processor for images)'
            )
        texts.append(part["text"])
    return "".join(texts)


def validate_conversation(messages: Any, require_assistant: bool = True) -> None:
    """Raise ``ValueError`` naming every problem of one conversation (used before any Jinja rendering)."""
    problems = conversation_problems(messages, require_assistant)
    if problems:
        raise ValueError("invalid conversation: " + "; ".join(problems))


def _describe(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:60]}{'...' if len(text) > 60 else ''}"
