"""Padding-free batches: every example of a batch concatenated into one row, no padding token anywhere.

``PaddingFreeCollator`` is a drop-in ``data_collator=`` for TRL's ``SFTTrainer`` (or any HF Trainer). For examples of
lengths ``n_1..n_k`` it returns ``input_ids``/``labels``/``position_ids`` of shape ``(1, sum n_i)``, position ids
restarting at 0 for each example, and the flash-attention varlen metadata (``cu_seq_lens_q/k``, ``max_length_q/k``).

Labels: an example's ``labels`` column when present, else its ``input_ids``; then, like TRL's dataset preparation,
tokens whose ``assistant_masks`` is 0 (always) or ``completion_mask`` is 0 (when ``completion_only_loss``) get -100.
The first token of every example gets -100 too, so no token is ever trained to follow the previous example.

Attention never crosses an example boundary: with no ``attention_mask`` in the batch, transformers 5 reads the
restarting ``position_ids`` (``masking_utils.find_packed_sequence_indices``) and builds a block-diagonal causal mask
for SDPA/eager -- but only when no KV cache exists, and models default to ``use_cache=True``, so the batch carries
``use_cache=False`` -- and flash-attention-2 uses the varlen kernel with ``cu_seq_lens``. fasttune relies on that (tested
exactly in ``tests/patch/test_padding_free.py``: the packed loss equals the per-example losses).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..data.masking import IGNORE_INDEX


def _as_list(value: Any) -> list[int]:
    return value.tolist() if isinstance(value, torch.Tensor) else list(value)


@dataclass
class PaddingFreeCollator:
    """Concatenate a batch of tokenized examples into one padding-free row (see the module docstring)."""

    completion_only_loss: bool = field(
        default=True, metadata={"help": "apply a `completion_mask` column (TRL's prompt-completion datasets)"})
    pad_to_multiple_of: int | None = field(
        default=None, metadata={"help": "pad the row to a multiple of this with one extra masked segment"})
    pad_token_id: int = field(default=0, metadata={"help": "token id used for that padding segment"})
    return_flash_attn_kwargs: bool = field(
        default=True, metadata={"help": "also return cu_seq_lens_q/k and max_length_q/k for varlen attention"})

    def __post_init__(self) -> None:
        if self.pad_to_multiple_of is not None and self.pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of: {self.pad_to_multiple_of!r} must be a positive integer or None")

    def _labels(self, example: dict[str, Any]) -> list[int]:
        ids = _as_list(example["input_ids"])
        labels = _as_list(example["labels"]) if "labels" in example else list(ids)
        if len(labels) != len(ids):
            raise ValueError(f"labels: length {len(labels)} differs from input_ids length {len(ids)}")
        masks = []
        if "assistant_masks" in example:
            masks.append(_as_list(example["assistant_masks"]))
        if self.completion_only_loss and "completion_mask" in example:
            masks.append(_as_list(example["completion_mask"]))
        for mask in masks:
            if len(mask) != len(ids):
                raise ValueError(f"mask column: length {len(mask)} differs from input_ids length {len(ids)}")
            labels = [lab if keep else IGNORE_INDEX for lab, keep in zip(labels, mask)]
        return labels

    def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        if not examples:
            raise ValueError("examples: the batch is empty")
        ids: list[int] = []
        labels: list[int] = []
        lengths: list[int] = []
        for example in examples:
            seq = _as_list(example["input_ids"])
            lab = self._labels(example)
            # TRL's packed datasets carry the lengths of the documents inside one example
            parts = _as_list(example["seq_lengths"]) if "seq_lengths" in example else [len(seq)]
            if sum(parts) != len(seq):
                raise ValueError(f"seq_lengths: {parts} do not add up to the example length {len(seq)}")
            ids += seq
            labels += lab
            lengths += [n for n in parts if n > 0]
        if self.pad_to_multiple_of:
            extra = -len(ids) % self.pad_to_multiple_of
            if extra:
                ids += [self.pad_token_id] * extra
                labels += [IGNORE_INDEX] * extra
                lengths.append(extra)
        return self._batch(ids, labels, lengths)

    def _batch(self, ids: list[int], labels: list[int], lengths: list[int]) -> dict[str, Any]:
        position_ids = torch.cat([torch.arange(n) for n in lengths])
        label_t = torch.tensor(labels, dtype=torch.long)
        label_t[position_ids == 0] = IGNORE_INDEX
        batch: dict[str, Any] = {
            "input_ids": torch.tensor(ids, dtype=torch.long)[None],
            "labels": label_t[None],
            "position_ids": position_ids[None],
            # transformers only reads packed position_ids when no KV cache is built (see the module docstring)
            "use_cache": False,
        }
        if self.return_flash_attn_kwargs:
            cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
            cu[1:] = torch.cumsum(torch.tensor(lengths, dtype=torch.int32), 0)
            batch["cu_seq_lens_q"] = batch["cu_seq_lens_k"] = cu
            batch["max_length_q"] = batch["max_length_k"] = max(lengths)
        return batch


def segment_lengths(position_ids: torch.Tensor) -> list[int]:
    """Lengths of the packed segments of a ``(seq,)`` or ``(1, seq)`` position-id row (a new one starts at each 0)."""
    row = position_ids.reshape(-1)
    starts = torch.nonzero(row == 0).flatten().tolist()
    if not starts or starts[0] != 0:
        starts = [0] + starts
    bounds = starts + [row.numel()]
    return [b - a for a, b in zip(bounds[:-1], bounds[1:])]


def packed_attention_implementation(device: torch.device | str) -> str:
    """The attention to load a model with for padding-free batches on ``device``.

    CUDA with the ``flash_attn`` package: ``"flash_attention_2"`` (varlen kernel, reads ``cu_seq_lens``). Anything
    else: ``"sdpa"``, for which transformers builds the block-diagonal causal mask from the restarting position ids.
    """
    import importlib.util

    if torch.device(device).type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"
