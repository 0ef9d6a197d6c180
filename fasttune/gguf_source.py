"""A GGUF file as the base model: dequantized once into a plain model folder, cached, then loaded like any folder.

``FastLanguageModel.from_pretrained("model.gguf")`` (or a folder whose only weights are one ``.gguf`` file) reads the
file with transformers (``gguf_file=``: the weights dequantized to float32, the tokenizer and chat template the file
carries). transformers marks such a model as GGUF-quantized and refuses ``save_pretrained``, and 4-bit/8-bit loading
starts from a plain checkpoint, so the model is rebuilt from its config and state dict and written, with its
tokenizer, into ``<cache>/gguf/<file stem>-<key>`` (``$FASTTUNE_CACHE`` or ``~/.cache/fasttune``; the key changes
when the file does). Every later step (quantizing, LoRA, saves, GGUF export) sees an ordinary model folder.

A file that is not a readable GGUF (truncated, another format), of an architecture transformers cannot read, or
without a tokenizer is an error naming the file and what is missing; nothing is written then (the folder appears
atomically).
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import torch

from .export.atomic import atomic_directory

logger = logging.getLogger("fasttune")

SUFFIX = ".gguf"


def cache_root() -> Path:
    return Path(os.environ.get("FASTTUNE_CACHE") or Path.home() / ".cache" / "fasttune").expanduser()


def gguf_in(path: Path) -> Path | None:
    """The GGUF file ``path`` names: the file itself, or a folder's only ``.gguf`` file when it has no config.json."""
    if path.is_file():
        return path if path.suffix.lower() == SUFFIX else None
    if not path.is_dir() or (path / "config.json").is_file() or (path / "adapter_config.json").is_file():
        return None
    found = sorted(p for p in path.iterdir() if p.suffix.lower() == SUFFIX and not p.name.startswith("mmproj"))
    if len(found) > 1:
        raise ValueError(f"model_name: {str(path)!r} holds {len(found)} GGUF files ({', '.join(p.name for p in found)}"
                         "); pass the path of the one to load")
    return found[0] if found else None


def _key(file: Path) -> str:
    """Changes when the file does: its size, modification time and its first and last MiB."""
    stat = file.stat()
    digest = hashlib.sha256(f"{stat.st_size}:{stat.st_mtime_ns}".encode())
    with open(file, "rb") as f:
        digest.update(f.read(1 << 20))
        f.seek(max(0, stat.st_size - (1 << 20)))
        digest.update(f.read())
    return digest.hexdigest()[:16]


def gguf_model_folder(file: Path) -> Path:
    """The cached plain model folder of GGUF ``file`` (written on first use)."""
    folder = cache_root() / "gguf" / f"{file.stem}-{_key(file)}"
    if (folder / "config.json").is_file():
        return folder
    model, tokenizer = _read(file)
    logger.warning("fasttune: %s read from GGUF (weights dequantized); cached as a model folder in %s", file.name,
                   folder)
    with atomic_directory(folder) as scratch:
        model.save_pretrained(scratch)
        tokenizer.save_pretrained(scratch)
    return folder


def _read(file: Path) -> tuple[torch.nn.Module, object]:
    """transformers' GGUF reading, rebuilt as a plain (not GGUF-quantized) model; errors name the file."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    where = dict(pretrained_model_name_or_path=str(file.parent), gguf_file=file.name)
    try:
        config = AutoConfig.from_pretrained(**where)
    except (ValueError, OSError, KeyError, EOFError, IndexError) as error:
        raise ValueError(f"model_name: {str(file)!r} cannot be read as a GGUF model ({type(error).__name__}: "
                         f"{error}); it may be truncated, not a GGUF file, or of an architecture transformers does "
                         "not read from GGUF") from error
    try:
        tokenizer = AutoTokenizer.from_pretrained(**where)
    except (ValueError, OSError, KeyError, TypeError) as error:
        raise ValueError(f"model_name: {str(file)!r} has no tokenizer transformers can read ({type(error).__name__}: "
                         f"{error}); a GGUF base model needs the tokenizer it was trained with") from error
    try:
        loaded = AutoModelForCausalLM.from_pretrained(**where, dtype=torch.float32)
    except (ValueError, OSError, KeyError, EOFError, RuntimeError) as error:
        raise ValueError(f"model_name: {str(file)!r}: its weights cannot be read ({type(error).__name__}: {error}); "
                         "the file may be truncated or hold a tensor type transformers cannot dequantize") from error
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
    plain.generation_config = loaded.generation_config
    del loaded  # one dequantized copy in memory while the folder is written, not two
    tied = {k for k in missing if k == "lm_head.weight" and getattr(config, "tie_word_embeddings", False)}
    if set(missing) - tied or unexpected:
        raise ValueError(f"model_name: {str(file)!r}: the GGUF's tensors do not fill the {type(plain).__name__} "
                         f"transformers builds from it (missing {sorted(set(missing) - tied)[:3]}, unexpected "
                         f"{sorted(unexpected)[:3]})")
    plain.tie_weights()
    return plain, tokenizer
