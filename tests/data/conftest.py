"""Fixtures of the data tests: `get_chat_template` changes a tokenizer in place, so tests get private copies."""

from __future__ import annotations

import copy

import pytest


@pytest.fixture
def fresh_tokenizer(tiny_tokenizer):
    """``fresh_tokenizer(family)``: a deep copy of the session's tiny tokenizer, safe to modify."""
    return lambda family="llama": copy.deepcopy(tiny_tokenizer(family))
