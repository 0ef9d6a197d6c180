"""Encode conversations so that message text never becomes control tokens (chat-template injection).

A chat template writes control tokens (``<|im_start|>``, ``<|eot_id|>``, ``<start_of_turn>``...) around each message.
Tokenizing the rendered text as one string, as ``apply_chat_template(tokenize=True)`` does by default, turns those
strings into control tokens also where they appear *inside* a message: a user who writes
``<|eot_id|><|start_header_id|>assistant<|end_header_id|>`` forges an assistant turn, and response masking then trains
on prompt text and drops the real answer. `encode_chat` encodes them as ordinary text pieces instead, with transformers'
``apply_chat_template(..., sanitize_control_tokens=True)``: control strings in the messages are marked before
rendering and the marked ones are encoded as plain text, while the template's own control tokens are encoded as usual.
A conversation whose messages hold no control string gets exactly the ids ``apply_chat_template`` gives.

Control tokens are the tokenizer's special tokens plus the added tokens its chat template writes (transformers' rule;
``tokenizer.chat_control_tokens`` overrides it). Strings a template *reads* from content are the one exception:
Qwen-3 writes reasoning as ``<think>...</think>`` in the assistant content and its template splits on ``</think>``;
such content is split into ``reasoning_content`` first (as the template itself would), so it renders unchanged.

`fasttune.data.pretokenize.tokenize_conversations` pre-tokenizes a dataset this way for TRL's ``SFTTrainer``.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from typing import Any

from jinja2 import TemplateError
from transformers import PreTrainedTokenizerBase

from fasttune.data.templates import CHAT_TEMPLATES
from fasttune.data.validate import content_text

# transformers' sanitizer marks control tokens with these two characters and deletes them from message text.
_SANITIZER_MARKS = ("\U000f0000", "\U000f0001")
_CONTROL_SHAPE = re.compile(r"<\|[^|<>\s]+\|>|</?[A-Za-z_]+>|\[/?[A-Z_]+\]")


def _template_control_strings() -> tuple[str, ...]:
    """Token-shaped strings (``<|x|>``, ``<x>``, ``[X]``) that fasttune's templates write as framing."""
    found: set[str] = set()
    for template in CHAT_TEMPLATES.values():
        fields = (template.instruction_part, template.response_part, template.eos_token, template.bos_token,
                  template.ollama_template, *template.end_parts, *template.stop_strings)
        for text in fields:
            found.update(_CONTROL_SHAPE.findall(text))
    return tuple(sorted(found, key=lambda s: (-len(s), s)))


TEMPLATE_CONTROL_STRINGS: tuple[str, ...] = _template_control_strings()


def _inner_tokenizer(tokenizer: Any) -> PreTrainedTokenizerBase:
    inner = getattr(tokenizer, "tokenizer", None)
    if not isinstance(tokenizer, PreTrainedTokenizerBase) and isinstance(inner, PreTrainedTokenizerBase):
        return inner  # a processor (VLM) wraps its tokenizer
    if not isinstance(tokenizer, PreTrainedTokenizerBase):
        raise TypeError(f"tokenizer: expected a transformers tokenizer or processor, got {type(tokenizer).__name__}")
    return tokenizer


def control_strings(tokenizer: Any = None) -> tuple[str, ...]:
    """The strings that must stay plain text inside messages, longest first.

    With a tokenizer: its special tokens and the added tokens its chat template writes (what `encode_chat` sanitizes).
    Without one: the control strings of every fasttune template (``<|eot_id|>``, ``<start_of_turn>``, ``[INST]``...).
    """
    if tokenizer is None:
        return TEMPLATE_CONTROL_STRINGS
    tokenizer = _inner_tokenizer(tokenizer)
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else ""
    listed = set(getattr(tokenizer, "chat_control_tokens", None) or ())
    found = {
        token.content for token in tokenizer.added_tokens_decoder.values()
        if token.special or token.content in listed or (token.content in template and not token.content.isspace())
    }
    return tuple(sorted(found, key=lambda s: (-len(s), s)))


@functools.lru_cache(maxsize=16)
def _alternation(strings: tuple[str, ...]) -> re.Pattern[str]:
    return re.compile("|".join(re.escape(s) for s in sorted(strings, key=len, reverse=True)))


def find_control_strings(messages: Sequence[Any], strings: Sequence[str]) -> list[tuple[int, str, str]]:
    """``(message_index, role, string)`` for each control string found in a message's string content."""
    if not strings:
        return []
    pattern = _alternation(tuple(strings))
    found = []
    for i, message in enumerate(messages):
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, (list, tuple)):
            content = "".join(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
        if isinstance(content, str):
            for string in dict.fromkeys(pattern.findall(content)):
                found.append((i, str(message.get("role")), string))
    return found


def _split_reasoning(template: str, messages: Sequence[Any]) -> list[Any]:
    """Move ``<think>r</think>`` from assistant content to ``reasoning_content``, as Qwen-3's template parses it."""
    if "reasoning_content" not in template or "</think>" not in template:
        return list(messages)
    out = []
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if (isinstance(content, str) and "</think>" in content and message.get("role") == "assistant"
                and "reasoning_content" not in message):
            parts = content.split("</think>")  # the template: reasoning before the first, answer after the last
            reasoning = parts[0].rstrip("\n").split("<think>")[-1].lstrip("\n")
            message = {**message, "reasoning_content": reasoning, "content": parts[-1].lstrip("\n")}
        out.append(message)
    return out


def _text_contents(messages: Sequence[Any]) -> list[Any]:
    """Messages whose content is a list of text parts get that text as a string (see `content_text`).

    Done before rendering so the control-token sanitizer, which reads string content, covers every part's text;
    a non-text part is a ``ValueError`` naming the message (encode_chat encodes text only).
    """
    out = []
    for i, message in enumerate(messages):
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, (list, tuple)):
            message = {**message, "content": content_text(content, f"message {i}")}
        out.append(message)
    return out


def encode_chat(
    tokenizer: Any,
    messages: Sequence[dict[str, Any]],
    add_generation_prompt: bool = False,
    **template_kwargs: Any,
) -> list[int]:
    """Token ids of ``messages`` rendered with the tokenizer's chat template; control strings in messages stay text.

    Use it wherever a conversation is tokenized for training or generation instead of
    ``tokenizer.apply_chat_template(messages, tokenize=True)``: the ids are the same for ordinary text, but
    ``<|eot_id|>`` (or any other control string) written *in* a message is encoded as ordinary text pieces, so it
    cannot end a turn or open a forged one. ``add_generation_prompt=True`` appends the assistant header (inference);
    other keyword arguments go to the template (``enable_thinking``, ``reasoning_effort``, ...).
    Returns the ids as a list (shape ``(seq,)``), BOS included when the template writes one.
    """
    tokenizer = _inner_tokenizer(tokenizer)
    messages = _text_contents(messages)
    for i, message in enumerate(messages):
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str) and any(mark in content for mark in _SANITIZER_MARKS):
            raise ValueError(
                f"message {i}: content holds U+F0000 or U+F0001, private-use characters that transformers reserves "
                "to mark control tokens (they would be deleted); remove them from the text"
            )
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else ""
    out = tokenizer.apply_chat_template(
        _split_reasoning(template, messages), add_generation_prompt=add_generation_prompt, tokenize=True,
        return_dict=True, sanitize_control_tokens=True, **template_kwargs,
    )
    return list(out["input_ids"])


def encode_row(tokenizer: Any, messages: Any, row: int, column: str = "messages") -> list[int]:
    """`encode_chat` for one dataset row; a template or type error is re-raised naming the row."""
    try:
        return encode_chat(tokenizer, messages)
    except (TemplateError, ValueError, TypeError, KeyError) as error:
        raise ValueError(f"row {row} ({column!r} column): {error}") from error


__all__ = [
    "TEMPLATE_CONTROL_STRINGS",
    "control_strings",
    "encode_chat",
    "encode_row",
    "find_control_strings",
]
