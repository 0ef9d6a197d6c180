"""`tokenize_conversations`: tokenize a conversation dataset for TRL's ``SFTTrainer`` without template injection.

``SFTTrainer`` tokenizes a ``messages`` column with ``apply_chat_template``, which turns control strings written inside
messages into real control tokens, and a template error raised there does not say which row failed. A dataset that
already has ``input_ids`` is not tokenized again by the trainer, so tokenizing it here with `encode_chat` closes both
gaps; truncation to ``max_length`` and labels are still done by the trainer (then ``train_on_responses_only``).
"""

from __future__ import annotations

from typing import Any

from fasttune.data.check import find_conversation_column
from fasttune.data.encode import encode_row
from fasttune.data.validate import conversation_problems


def tokenize_conversations(
    dataset: Any, tokenizer: Any, column: str | None = None, num_proc: int | None = None
) -> Any:
    """Add an ``input_ids`` column (`encode_chat` of each conversation) to a ``datasets.Dataset``; returns it.

    The conversation column is kept (``train_on_responses_only`` reads it to re-check rows). Each row is checked first
    (`conversation_problems`: roles, empty or non-string content, no assistant turn) and any failure names the row.
    """
    name = find_conversation_column(dataset.column_names, column)

    def encode(example: dict, row: int) -> dict:
        problems = conversation_problems(example[name])
        if problems:
            raise ValueError(f"row {row} ({name!r} column): " + "; ".join(problems))
        return {"input_ids": encode_row(tokenizer, example[name], row, name)}

    return dataset.map(encode, with_indices=True, num_proc=num_proc, desc="Tokenizing conversations")


__all__ = ["tokenize_conversations"]
