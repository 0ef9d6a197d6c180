"""The tokenizer as GGUF metadata: tokens, types, merges or scores, special ids, chat template.

Two tokenizer models are written, read from the fast tokenizer's ``tokenizer.json``:

- byte-level BPE (GPT-2 / Llama 3 / Qwen style) -> ``tokenizer.ggml.model = "gpt2"`` with merges and the
  pre-tokenizer name llama.cpp uses to pick its split regex (``PRE_TOKENIZERS``: a regex we cannot name would make
  llama.cpp split text differently, so it is an error, not a guess);
- BPE with byte fallback over "▁"-words (Llama 2 / Mistral / Gemma SentencePiece style) -> ``"llama"`` with scores:
  the pieces and scores of the SentencePiece model file when the tokenizer has one, else ``-rank`` of the merge that
  forms each piece (llama.cpp's SPM tokenizer merges the highest score first, i.e. the lowest rank, as BPE does).

The vocabulary is padded with ``[PAD{id}]`` tokens of type UNUSED up to the embedding's row count, as llama.cpp
requires one token per row.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any

from gguf import GGUFWriter, TokenType

from fasttune.data.ollama import special_tokens_added

logger = logging.getLogger(__name__)

# The split regex of each pre-tokenizer llama.cpp knows, as found in tokenizer.json (facts about those tokenizers).
_LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_TOKENIZERS: dict[str, str] = {_LLAMA3_REGEX: "llama-bpe", _QWEN2_REGEX: "qwen2"}

# End-of-turn markers llama.cpp should stop on, in the order they are looked for in a chat template.
EOT_MARKERS: tuple[str, ...] = ("<|eot_id|>", "<|im_end|>", "<end_of_turn>", "<|end|>", "<|endoftext|>", "</s>")


@dataclass
class GGUFVocab:
    """Everything the writer needs about the tokenizer."""

    model: str  # "gpt2" | "llama"
    pre: str | None
    tokens: list[str]
    types: list[int]
    scores: list[float] | None = None
    merges: list[str] = field(default_factory=list)
    special: dict[str, int] = field(default_factory=dict)  # bos / eos / unk / pad / eot -> id
    add_bos: bool = False
    add_eos: bool = False
    add_space_prefix: bool | None = None
    chat_template: str | None = None

    def write(self, writer: GGUFWriter) -> None:
        writer.add_tokenizer_model(self.model)
        if self.pre is not None:
            writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        writer.add_token_types(self.types)
        if self.scores is not None:
            writer.add_token_scores(self.scores)
        if self.merges:
            writer.add_token_merges(self.merges)
        setters = {"bos": writer.add_bos_token_id, "eos": writer.add_eos_token_id, "unk": writer.add_unk_token_id,
                   "pad": writer.add_pad_token_id, "eot": writer.add_eot_token_id}
        for kind, token_id in self.special.items():
            setters[kind](token_id)
        writer.add_add_bos_token(self.add_bos)
        writer.add_add_eos_token(self.add_eos)
        if self.add_space_prefix is not None:
            writer.add_add_space_prefix(self.add_space_prefix)
        if self.chat_template:
            writer.add_chat_template(self.chat_template)


def _pre_tokenizer_name(spec: dict[str, Any] | None) -> str:
    """llama.cpp's pre-tokenizer name for a tokenizer.json ``pre_tokenizer`` entry."""
    if spec and spec.get("type") == "ByteLevel" and spec.get("use_regex", True):
        return "gpt-2"
    if spec and spec.get("type") == "Sequence":
        for item in spec.get("pretokenizers", []):
            regex = (item.get("pattern") or {}).get("Regex") if item.get("type") == "Split" else None
            if regex is not None:
                if regex in PRE_TOKENIZERS:
                    return PRE_TOKENIZERS[regex]
                raise ValueError(
                    f"tokenizer: its split regex {regex!r} is not one llama.cpp knows by name (known: gpt-2, "
                    f"{', '.join(sorted(set(PRE_TOKENIZERS.values())))}); pass pre_tokenizer='<name>' if you know it"
                )
    raise ValueError(f"tokenizer: cannot name its pre-tokenizer {json.dumps(spec)[:200]}; pass pre_tokenizer='<name>'")


def _merge_strings(merges: list[Any]) -> list[str]:
    return [m if isinstance(m, str) else " ".join(m) for m in merges]


def _eot_id(tokenizer: Any, template: Any) -> int | None:
    marker = getattr(template, "eos_token", None)
    if marker is None:
        text = tokenizer.chat_template or ""
        marker = next((m for m in EOT_MARKERS if m in text), None)
    if marker is None:
        return None
    token_id = tokenizer.convert_tokens_to_ids(marker)
    return token_id if isinstance(token_id, int) and token_id != tokenizer.unk_token_id else None


def _spm_scores(model: dict[str, Any], vocab: dict[str, int]) -> dict[int, float]:
    score = {i: (0.0 if len(t) == 1 or t.startswith("<0x") else -1e9) for t, i in vocab.items()}
    for rank, merge in enumerate(_merge_strings(model.get("merges", []))):
        merged = merge.replace(" ", "", 1)
        if merged in vocab:
            score[vocab[merged]] = max(score[vocab[merged]], -float(rank))
    return score


def _sentencepiece_file_scores(tokenizer: Any) -> dict[int, float] | None:
    """Scores from the tokenizer's SentencePiece model file, when it has one and sentencepiece is installed."""
    path = getattr(tokenizer, "vocab_file", None)
    if not path or not os.path.isfile(str(path)):
        return None
    if importlib.util.find_spec("sentencepiece") is None:
        logger.info("gguf: sentencepiece is not installed; token scores are derived from the BPE merge ranks")
        return None
    import sentencepiece

    proc = sentencepiece.SentencePieceProcessor(model_file=str(path))
    return {i: proc.GetScore(i) for i in range(proc.GetPieceSize())}


def build_vocab(tokenizer: Any, n_vocab: int, template: Any = None, pre_tokenizer: str | None = None) -> GGUFVocab:
    """Read a transformers fast tokenizer into a ``GGUFVocab`` of exactly ``n_vocab`` tokens (embedding rows)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise TypeError(f"tokenizer: {type(tokenizer).__name__} is not a fast tokenizer (no tokenizer.json); "
                        "load it with use_fast=True")
    spec = json.loads(backend.to_str())
    model = spec["model"]
    if model.get("type") != "BPE":
        raise ValueError(f"tokenizer: model type {model.get('type')!r} cannot be written to GGUF by fasttune; "
                         "supported: BPE (byte-level or with byte fallback)")
    vocab: dict[str, int] = dict(model["vocab"])
    added = {t["id"]: t for t in spec.get("added_tokens", [])}
    for token_id, entry in added.items():
        vocab[entry["content"]] = token_id
    top = max(vocab.values())
    if top >= n_vocab:
        raise ValueError(f"tokenizer: token id {top} does not fit the model's {n_vocab} embedding rows; "
                         "resize the embeddings (model.resize_token_embeddings) before export")
    spm = bool(model.get("byte_fallback"))
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    types = [int(TokenType.UNUSED)] * n_vocab
    for text, token_id in vocab.items():
        tokens[token_id] = text
        types[token_id] = int(TokenType.NORMAL)
        if spm and len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
            types[token_id] = int(TokenType.BYTE)
    for token_id, entry in added.items():
        types[token_id] = int(TokenType.CONTROL if entry.get("special") else TokenType.USER_DEFINED)
    if tokenizer.unk_token_id is not None:
        types[tokenizer.unk_token_id] = int(TokenType.UNKNOWN)
    special = {k: getattr(tokenizer, f"{k}_token_id") for k in ("bos", "eos", "unk", "pad")}
    special["eot"] = _eot_id(tokenizer, template)
    add_bos, add_eos = special_tokens_added(tokenizer)  # the Modelfile follows the same rule
    out = GGUFVocab(
        model="llama" if spm else "gpt2",
        pre=None if spm else (pre_tokenizer or _pre_tokenizer_name(spec.get("pre_tokenizer"))),
        tokens=tokens,
        types=types,
        special={k: v for k, v in special.items() if v is not None},
        add_bos=add_bos,
        add_eos=add_eos,
        chat_template=getattr(tokenizer, "chat_template", None) or getattr(template, "jinja", None),
    )
    if spm:
        by_id = _sentencepiece_file_scores(tokenizer) or _spm_scores(model, vocab)
        out.scores = [by_id.get(i, -1e9) for i in range(n_vocab)]
        out.add_space_prefix = _adds_space_prefix(spec)
    else:
        out.merges = _merge_strings(model.get("merges", []))
    return out


def _adds_space_prefix(spec: dict[str, Any]) -> bool:
    """True when the tokenizer prepends "▁" to the text (Llama 2 style), False for Gemma style."""
    def walk(node: Any) -> bool:
        if isinstance(node, dict):
            if node.get("type") == "Prepend" and node.get("prepend") == "▁":
                return True
            if node.get("type") == "Metaspace" and node.get("prepend_scheme", "always") != "never":
                return True
            return any(walk(v) for v in node.values())
        if isinstance(node, list):
            return any(walk(v) for v in node)
        return False

    return walk(spec.get("normalizer")) or walk(spec.get("pre_tokenizer"))
