"""The quickstart: ``python -m fasttune.quickstart`` (see __main__.py).

The quickstart's tiny model and fact table live here so that ``fasttune train`` (``model.name: tiny-llama``,
``data.path: quickstart-facts``) builds exactly the same ones.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from fasttune.tiny import build_tiny_model, build_tokenizer

FACTS_FILE = "facts.jsonl"


def facts_path() -> Path:
    """The bundled fact table (24 Alpaca rows: instruction, output)."""
    return Path(str(resources.files("fasttune.quickstart").joinpath(FACTS_FILE)))


def load_facts() -> list[dict[str, str]]:
    text = resources.files("fasttune.quickstart").joinpath(FACTS_FILE).read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


# the architecture of the quickstart's tiny random model (--tiny)
FAMILY = "llama"


def quickstart_tokenizer(facts: list[dict[str, str]] | None = None) -> PreTrainedTokenizerBase:
    """The tiny Llama tokenizer, trained offline on the fact table (vocabulary 1024)."""
    facts = load_facts() if facts is None else facts
    corpus = [f"{row['instruction']} {row['output']}" for row in facts] * 4
    return build_tokenizer(FAMILY, extra_texts=corpus, vocab_size=1024)


def build_base(folder: Path, facts: list[dict[str, str]] | None = None) -> Path:
    """Write the quickstart's tiny Llama-architecture model (random weights, seed 0) and tokenizer to ``folder``."""
    return build_tiny_model(FAMILY, folder, tokenizer=quickstart_tokenizer(facts), seed=0)


__all__ = ["FAMILY", "build_base", "facts_path", "load_facts", "quickstart_tokenizer"]
