"""Export tests get private copies of the session tokenizers: get_chat_template and chat_template edits mutate a
tokenizer in place, and the shared session cache must stay pristine for every other test."""

from __future__ import annotations

import copy

import pytest
import torch
from export_helpers import lora_model

from fasttune.export.merge import merged_state_dict


@pytest.fixture
def tiny_tokenizer(tiny_tokenizer):
    """``tiny_tokenizer(family)``: a fresh deep copy of the session tokenizer of ``family``."""
    return lambda family="llama": copy.deepcopy(tiny_tokenizer(family))


@pytest.fixture(scope="module")
def merged(tiny_model_dir):
    """``merged(family) -> (lora_model, float32 merged state)``, built once per module."""
    cache = {}

    def get(family):
        if family not in cache:
            model = lora_model(tiny_model_dir(family), family)
            cache[family] = (model, merged_state_dict(model, dtype=torch.float32))
        return cache[family]

    return get
