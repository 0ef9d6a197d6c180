"""fasttune's data layer: chat templates as data, dataset standardisation and checks, response-only training.

The Unsloth notebook flow::

    from fasttune.chat_templates import get_chat_template, standardize_sharegpt, train_on_responses_only
    from fasttune.data import check_dataset

    tokenizer = get_chat_template(tokenizer, "llama-3.1")          # template + end-of-turn eos + markers
    dataset = standardize_sharegpt(dataset).rename_column("conversations", "messages")
    dataset = check_dataset(dataset, tokenizer, max_seq_length=2048)  # row-by-row report, or skip_invalid=True
    trainer = SFTTrainer(model=model, processing_class=tokenizer, train_dataset=dataset, args=SFTConfig(...))
    trainer = train_on_responses_only(trainer)                      # labels -100 outside assistant turns
    trainer.train()

Pass conversations (a ``messages`` column) rather than rendered text: SFTTrainer tokenizes text with the tokenizer's
special tokens, which doubles the BOS of templates that write it (a warning says so).

Message text that spells a control token (``<|eot_id|>``...) stays plain text wherever fasttune tokenizes:
`encode_chat` (for generation and your own code), `tokenize_conversations` (a dataset for SFTTrainer) and
`train_on_responses_only` (re-tokenizes such rows of a TRL-tokenized dataset); `check_dataset` reports them.
"""

from fasttune.data.chat import get_chat_template, sync_model_eos, template_of
from fasttune.data.check import DatasetError, check_dataset
from fasttune.data.encode import control_strings, encode_chat
from fasttune.data.markers import detect_template, markers_for
from fasttune.data.masking import (
    IGNORE_INDEX,
    TokenTexts,
    marker_pattern,
    response_mask,
    response_spans,
    segmented_response_mask,
)
from fasttune.data.pretokenize import tokenize_conversations
from fasttune.data.prompt_template import apply_chat_template, construct_chat_template
from fasttune.data.render import render
from fasttune.data.responses import train_on_responses_only
from fasttune.data.standardize import standardize_data_formats, standardize_sharegpt, to_sharegpt
from fasttune.data.templates import CHAT_TEMPLATES, ChatTemplate, resolve_template, template_names
from fasttune.data.validate import conversation_problems, validate_conversation

__all__ = [
    "CHAT_TEMPLATES",
    "IGNORE_INDEX",
    "ChatTemplate",
    "DatasetError",
    "TokenTexts",
    "apply_chat_template",
    "check_dataset",
    "control_strings",
    "construct_chat_template",
    "conversation_problems",
    "detect_template",
    "encode_chat",
    "get_chat_template",
    "marker_pattern",
    "markers_for",
    "render",
    "resolve_template",
    "response_mask",
    "response_spans",
    "segmented_response_mask",
    "standardize_data_formats",
    "standardize_sharegpt",
    "sync_model_eos",
    "template_names",
    "template_of",
    "to_sharegpt",
    "tokenize_conversations",
    "train_on_responses_only",
    "validate_conversation",
]
