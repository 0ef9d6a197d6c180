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
        content = message.get("content")
        if not isinstance(content, str):
            problems.append(f"message {i} ({role}): content must be a string, got {_describe(content)}")
        elif not content.strip():
            problems.append(f"message {i} ({role}): content is empty")
    if require_assistant and not any(isinstance(m, dict) and m.get("role") == "assistant" for m in messages):
        problems.append("the conversation has no assistant turn, so nothing would be trained")
    return problems


def validate_conversation(messages: Any, require_assistant: bool = True) -> None:
    """Raise ``ValueError`` naming every problem of one conversation (used before any Jinja rendering)."""
    problems = conversation_problems(messages, require_assistant)
    if problems:
        raise ValueError("invalid conversation: " + "; ".join(problems))


def _describe(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:60]}{'...' if len(text) > 60 else ''}"
