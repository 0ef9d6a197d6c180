"""Unsloth-compatible module: ``from fasttune.chat_templates import get_chat_template, train_on_responses_only``.

Everything here lives in `fasttune.data`; this module only re-exports it under the names Unsloth users know.
"""

from fasttune.data import (
    CHAT_TEMPLATES,
    ChatTemplate,
    DatasetError,
    check_dataset,
    get_chat_template,
    resolve_template,
    response_mask,
    standardize_data_formats,
    standardize_sharegpt,
    to_sharegpt,
    train_on_responses_only,
)

__all__ = [
    "CHAT_TEMPLATES",
    "ChatTemplate",
    "DatasetError",
    "check_dataset",
    "get_chat_template",
    "resolve_template",
    "response_mask",
    "standardize_data_formats",
    "standardize_sharegpt",
    "to_sharegpt",
    "train_on_responses_only",
]
