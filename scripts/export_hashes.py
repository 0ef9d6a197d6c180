"""Every kind of file fasttune exports, written deterministically from tiny models, with its SHA-256.

    python scripts/export_hashes.py [OUT_DIR] > hashes.txt

A refactor that must not change behaviour is checked by running this before and after it and diffing the two
listings (one ``sha256  relative/path`` line per file, sorted). For every tiny text family with a GGUF map and every
tiny vision-language family (fasttune.tiny, fasttune.tiny.vision; fixed seeds, random LoRA weights so that the merge
is not the identity) it writes: the merged 16-bit safetensors folder, the LoRA adapter folder, and where the family
has a GGUF map one GGUF file per type in ``GGUF_TYPES`` (plus the mmproj file of a VLM and the Ollama Modelfile);
llama.cpp validation is not run. Every family is exported twice: loaded in 16-bit (float32) and in 4-bit (NF4).
OUT_DIR (default: a fixed folder under the system's temp dir) is emptied first; paths inside it are relative, so the
adapter configs name their base models the same way on every run; the script runs itself under PYTHONHASHSEED=0, so
that sets (peft's target_modules) are written in one order. About 30 s on two CPU cores.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from fasttune import FastLanguageModel, FastVisionModel
from fasttune.data.chat import get_chat_template
from fasttune.models import families, vision_families
from fasttune.tiny import FAMILIES, build_tiny_model
from fasttune.tiny.vision import build_tiny_vlm

GGUF_TYPES = ["f16", "bf16", "q8_0", "q4_0", "q4_k_m"]
SEED = 0


def _adapted(model, facade):
    torch.manual_seed(SEED)
    return facade.get_peft_model(model, r=8, lora_alpha=16, init_lora_weights=False, random_state=SEED)


def _export(model, tokenizer, out: Path, gguf: bool) -> None:
    model.save_pretrained_merged(str(out / "merged"), tokenizer, save_method="merged_16bit")
    if hasattr(model, "peft_config"):
        model.save_pretrained_merged(str(out / "lora"), tokenizer, save_method="lora")
    if gguf:
        model.save_pretrained_gguf(str(out / "gguf"), tokenizer, quantization_method=GGUF_TYPES)


def text_family(family: str, four_bit: bool = False) -> None:
    base = build_tiny_model(family, Path("base") / family, seed=SEED)
    model, tokenizer = FastLanguageModel.from_pretrained(str(base), load_in_4bit=four_bit, dtype=torch.float32,
                                                         max_seq_length=256)
    tokenizer = get_chat_template(tokenizer, "chatml")
    _export(_adapted(model, FastLanguageModel), tokenizer, Path("4bit" if four_bit else "16bit") / family, True)


def vision_family(family: str, has_gguf: bool, four_bit: bool = False) -> None:
    base = build_tiny_vlm(family, Path("base-vlm") / family, seed=SEED)
    model, processor = FastVisionModel.from_pretrained(str(base), load_in_4bit=four_bit, dtype=torch.float32,
                                                       max_seq_length=256)
    _export(_adapted(model, FastVisionModel), processor, Path("4bit-vlm" if four_bit else "16bit-vlm") / family,
            has_gguf)


def hashes(root: Path) -> list[str]:
    lines = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        lines.append(f"{hashlib.sha256(path.read_bytes()).hexdigest()}  {path.relative_to(root)}")
    return lines


def main(argv: list[str]) -> int:
    if os.environ.get("PYTHONHASHSEED") != "0":  # peft writes target_modules (a set) in hash order
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "PYTHONHASHSEED": "0"})
    out = Path(argv[0] if argv else Path(tempfile.gettempdir()) / "fasttune-export-hashes").resolve()
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    logging.basicConfig(level=logging.ERROR)
    os.chdir(out)
    by_family = {spec.family: spec for spec in families()}
    text = [f for f in FAMILIES if by_family[f].gguf is not None]
    for four_bit in (False, True):
        for family in text:
            text_family(family, four_bit)
    vlms = vision_families()
    for four_bit in (False, True):
        for vision in vlms:
            vision_family(vision.family, vision.mmproj is not None, four_bit)
    for family_dir in ("base", "base-vlm"):
        shutil.rmtree(out / family_dir)  # inputs, not exports
    print("\n".join(hashes(out)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
