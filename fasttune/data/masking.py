"""Response masks: which tokens of a tokenized conversation belong to assistant turns (the only ones trained on).

Markers are found as *text*, not as token-id subsequences: each token's text is recovered from the tokenizer (cached
per id) and the markers are searched in the joined text. This is robust to BPE merging a marker's last characters
with the content that follows (``"\\n\\n"`` + ``"Hello"``), which defeats id-subsequence matching.

An assistant span starts right after ``response_part`` and ends at the earliest of: the end of an ``end_parts``
marker (the end-of-turn token, kept in the loss so the model learns to stop), the start of the next
``instruction_part`` or ``response_part`` (excluded), or the end of the sequence. With no ``end_parts`` this is
Unsloth's rule (everything from a response marker to the next instruction marker). A token is trained when its text
overlaps a span; this is the rule transformers uses for ``{% generation %}`` masks, so for fasttune's templates the
two masks agree token for token (a test checks it for every template).

SentencePiece tokenizers in "legacy" mode (Llama-2, Mistral v1) put a ``▁`` (a space) at the start of the text that
follows a special token, so ``<|im_start|>user`` decodes as ``<|im_start|> user``; markers therefore match with an
optional space after each special token they contain.

Control tokens are matched as tokens, never as text: in the text that is searched, every added token (``<|eot_id|>``,
``<|im_start|>``...) is one private-use character, and markers are rewritten the same way. Message text that merely
*spells* a control token (``<|eot_id|>`` encoded as ordinary pieces by `fasttune.data.encode.encode_chat`) therefore
never matches a marker. Limitation: formats whose markers are plain text (alpaca's ``### Response:``, vicuna's
``ASSISTANT:``) cannot be told apart from the same text inside a message.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Sequence

from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100

# Added tokens are matched as one character each from Supplementary Private Use Area-B (U+100000..U+10FFFD); the same
# characters inside ordinary token text are replaced by U+FFFD so that message text can never forge one.
_SENTINEL_BASE = 0x100000
_SENTINEL_LIMIT = 0x10FFFD


class TokenTexts:
    """The text of each token id of ``tokenizer`` (cached), decoded after an anchor so leading spaces survive."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase):
        self.tokenizer = tokenizer
        self._anchor = tokenizer.encode("a", add_special_tokens=False)
        self._anchor_text = self._decode(self._anchor)
        self._cache: dict[int, str] = {}
        added = tokenizer.get_added_vocab()
        self.special_tokens: frozenset[str] = frozenset(added)
        if len(added) > _SENTINEL_LIMIT - _SENTINEL_BASE:
            raise ValueError(f"tokenizer: {len(added)} added tokens are more than response masking can tell apart")
        self._sentinel_of: dict[str, str] = {
            token: chr(_SENTINEL_BASE + i) for i, token in enumerate(sorted(added, key=lambda t: (-len(t), t)))
        }
        self._sentinel_of_id: dict[int, str] = {added[token]: char for token, char in self._sentinel_of.items()}
        self._unforgeable = {ord(char): "\ufffd" for char in self._sentinel_of.values()}
        self._token_re = re.compile("|".join(re.escape(t) for t in self._sentinel_of)) if added else None

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def piece(self, token_id: int) -> str:
        """The text token ``token_id`` contributes when it follows other text."""
        text = self._cache.get(token_id)
        if text is None:
            joined = self._decode(self._anchor + [token_id])
            if joined.startswith(self._anchor_text):
                text = joined[len(self._anchor_text):]
            else:
                text = self._decode([token_id])
            self._cache[token_id] = text
        return text

    def join(self, input_ids: Sequence[int]) -> tuple[str, list[int]]:
        """``(text, starts)``: the sequence's text and the character offset where each token starts."""
        starts, pieces, offset = [], [], 0
        for token_id in input_ids:
            piece = self.piece(int(token_id))
            starts.append(offset)
            pieces.append(piece)
            offset += len(piece)
        return "".join(pieces), starts

    @property
    def sentinels(self) -> frozenset[str]:
        """The characters that stand for added tokens in `match_join` text."""
        return frozenset(self._sentinel_of.values())

    def match_join(self, input_ids: Sequence[int]) -> tuple[str, list[int]]:
        """Like `join`, but each added token is its sentinel character and ordinary text cannot contain one."""
        starts, pieces, offset = [], [], 0
        for token_id in input_ids:
            piece = self._sentinel_of_id.get(int(token_id))
            if piece is None:
                piece = self.piece(int(token_id)).translate(self._unforgeable)
            starts.append(offset)
            pieces.append(piece)
            offset += len(piece)
        return "".join(pieces), starts

    def match_marker(self, marker: str) -> str:
        """``marker`` as `match_join` text: each added token it contains becomes its sentinel character."""
        if self._token_re is None:
            return marker
        return self._token_re.sub(lambda m: self._sentinel_of[m.group(0)], marker.translate(self._unforgeable))


def marker_pattern(marker: str, special_tokens: Collection[str] = ()) -> re.Pattern[str]:
    """A regex for ``marker`` that also accepts one space after each special token inside it (legacy SentencePiece)."""
    specials = sorted((t for t in special_tokens if t and t in marker), key=len, reverse=True)
    if not specials:
        return re.compile(re.escape(marker))
    parts = re.split("(" + "|".join(re.escape(t) for t in specials) + ")", marker)
    out = []
    for i, part in enumerate(parts):
        out.append(re.escape(part))
        follows = parts[i + 1] if i + 1 < len(parts) else ""
        if part in specials and i + 1 < len(parts) and follows and not follows.startswith(" "):
            out.append(" ?")
    return re.compile("".join(out))


def response_spans(
    text: str,
    instruction_part: str,
    response_part: str,
    end_parts: Sequence[str] = (),
    special_tokens: Collection[str] = (),
) -> list[tuple[int, int]]:
    """Character spans ``[start, end)`` of the assistant responses in ``text`` (rule in the module docstring)."""
    if not response_part:
        raise ValueError("response_part: must be a non-empty string (the text that opens an assistant turn)")
    response = marker_pattern(response_part, special_tokens)
    closers = [(marker_pattern(m, special_tokens), True) for m in end_parts if m]
    closers += [(marker_pattern(m, special_tokens), False) for m in (instruction_part, response_part) if m]
    spans, pos = [], 0
    while True:
        found = response.search(text, pos)
        if found is None:
            return spans
        start, end = found.end(), len(text)
        for pattern, inclusive in closers:
            hit = pattern.search(text, start)
            if hit is not None:
                end = min(end, hit.end() if inclusive else hit.start())
        if end > start:
            spans.append((start, end))
        pos = max(end, start)


def response_mask(
    input_ids: Sequence[int],
    tokenizer: PreTrainedTokenizerBase | TokenTexts,
    instruction_part: str,
    response_part: str,
    end_parts: Sequence[str] = (),
) -> list[int]:
    """1 for each token of ``input_ids`` (shape ``(seq,)``) inside an assistant response, else 0."""
    texts = tokenizer if isinstance(tokenizer, TokenTexts) else TokenTexts(tokenizer)
    text, starts = texts.match_join(input_ids)
    mask = [0] * len(starts)
    ends_at = [texts.match_marker(m) for m in end_parts]
    spans = response_spans(text, texts.match_marker(instruction_part), texts.match_marker(response_part), ends_at,
                           texts.sentinels)
    if not spans:
        return mask
    ends = starts[1:] + [len(text)]
    span_index = 0
    for i, (tok_start, tok_end) in enumerate(zip(starts, ends)):
        while span_index < len(spans) and spans[span_index][1] <= tok_start:
            span_index += 1
        if span_index == len(spans):
            break
        span_start, span_end = spans[span_index]
        if tok_end > span_start and tok_start < span_end and tok_end > tok_start:
            mask[i] = 1
    return mask


def segmented_response_mask(
    input_ids: Sequence[int],
    tokenizer: PreTrainedTokenizerBase | TokenTexts,
    instruction_part: str,
    response_part: str,
    end_parts: Sequence[str] = (),
    seq_lengths: Sequence[int] | None = None,
) -> list[int]:
    """`response_mask` computed separately on each packed sequence (``seq_lengths`` sums to ``len(input_ids)``)."""
    if seq_lengths is None:
        return response_mask(input_ids, tokenizer, instruction_part, response_part, end_parts)
    if sum(seq_lengths) != len(input_ids):
        raise ValueError(f"seq_lengths: {list(seq_lengths)} sum to {sum(seq_lengths)}, not to len(input_ids)="
                         f"{len(input_ids)}")
    texts = tokenizer if isinstance(tokenizer, TokenTexts) else TokenTexts(tokenizer)
    mask, offset = [], 0
    for length in seq_lengths:
        segment = input_ids[offset:offset + length]
        mask += response_mask(segment, texts, instruction_part, response_part, end_parts)
        offset += length
    return mask


def masked_labels(
    input_ids: Sequence[int], mask: Sequence[int], labels: Sequence[int] | None = None
) -> list[int]:
    """Labels: ``input_ids`` where ``mask`` is 1 and the old label (if any) is not ignored, else ``IGNORE_INDEX``."""
    old = input_ids if labels is None else labels
    return [
        int(tok) if keep and prev != IGNORE_INDEX else IGNORE_INDEX for tok, keep, prev in zip(input_ids, mask, old)
    ]
