"""Unsloth-compatible module: ``from fasttune.chat_templates import get_chat_template, train_on_responses_only``.

Everything here lives in `fasttune.data`; this module only re-exports it under the names Unsloth users know
(``apply_chat_template`` is Unsloth's *dataset* helper, see `fasttune.data.prompt_template`), plus
`encode_chat(tokenizer, messages, add_generation_prompt=True)`: token ids for generation in which message text that
spells a control token (``<|eot_id|>``...) stays text, so a user cannot forge a turn.
"""

from fasttune.data import (
    CHAT_TEMPLATES,
    ChatTemplate,
    DatasetError,
    apply_chat_template,
    check_dataset,
    encode_chat,
    get_chat_template,
    resolve_template,
    response_mask,
    standardize_data_formats,
    standardize_sharegpt,
    to_sharegpt,
    tokenize_conversations,
    train_on_responses_only,
)

__all__ = [
    "CHAT_TEMPLATES",
    "ChatTemplate",
    "DatasetError",
    "apply_chat_template",
    "check_dataset",
    "encode_chat",
    "get_chat_template",
    "resolve_template",
    "response_mask",
    "standardize_data_formats",
    "standardize_sharegpt",
    "to_sharegpt",
    "tokenize_conversations",
    "train_on_responses_only",
]
