"""Export tests get private copies of the session tokenizers: get_chat_template and chat_template edits mutate a
tokenizer in place, and the shared session cache must stay pristine for every other test."""

from __future__ import annotations

import copy

import pytest


@pytest.fixture
def tiny_tokenizer(tiny_tokenizer):
    """``tiny_tokenizer(family)``: a fresh deep copy of the session tokenizer of ``family``."""
    return lambda family="llama": copy.deepcopy(tiny_tokenizer(family))
