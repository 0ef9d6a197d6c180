"""``gguf_tensors`` (the fast tensor index that skips metadata values) gives exactly what gguf.GGUFReader gives."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGUFReader

from fasttune import FastLanguageModel
from fasttune.export.gguf.reader import gguf_tensors


@pytest.mark.parametrize("method", ["f16", "q8_0", "q4_k_m"])
def test_tensor_index_equals_gguf_reader(method, tiny_model_dir, tiny_tokenizer, tmp_path):
    model, tokenizer = FastLanguageModel.from_pretrained(str(tiny_model_dir("llama")), load_in_4bit=False,
                                                         dtype=torch.float32)
    path = model.save_pretrained_gguf(tmp_path, tokenizer, quantization_method=method)[0]
    ours, theirs = list(gguf_tensors(path)), GGUFReader(str(path)).tensors
    assert [t.name for t in ours] == [t.name for t in theirs] and len(ours) > 10
    for a, b in zip(ours, theirs):
        assert a.tensor_type == b.tensor_type and a.shape == tuple(int(x) for x in b.shape), a.name
        assert a.data.dtype == b.data.dtype and np.array_equal(a.data, b.data), a.name


def test_not_a_gguf_file_is_named(tmp_path):
    path = tmp_path / "x.gguf"
    path.write_bytes(b"NOPE" + bytes(64))
    with pytest.raises(ValueError, match="x.gguf: not a GGUF file"):
        list(gguf_tensors(path))
