"""``fasttune export`` and the exports a recipe asks for, through the model's own Unsloth-style methods.

adapter/ (peft LoRA, ``save_pretrained_merged(save_method="lora")``), merged/ (16-bit safetensors), gguf/ (one file
per type) and gguf/Modelfile (``fasttune.export.write_ollama_modelfile``). Every one is written atomically.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm
from transformers.trainer_utils import get_last_checkpoint

from fasttune import FastLanguageModel
from fasttune.config import ConfigError
from fasttune.export import write_ollama_modelfile

from .recipe import DTYPES, GGUF_TYPES, Recipe, RecipeError, load_recipe
from .report import folder_size


def plan(adapter: bool, merged: bool, gguf: list[str], ollama: bool) -> list[str]:
    return [k for k, on in (("adapter", adapter), ("merged", merged), ("gguf", bool(gguf)), ("ollama", ollama)) if on]


def run_exports(model: Any, tokenizer: Any, out: Path, adapter: bool = True, merged: bool = False,
                gguf: list[str] | None = None, ollama: bool = False, quiet: bool = False) -> list[dict[str, Any]]:
    """Write the asked exports under ``out``; returns ``[{"kind", "path", "bytes"}, ...]``."""
    gguf = list(gguf or [])
    steps = plan(adapter, merged, gguf, ollama)
    made: list[dict[str, Any]] = []
    gguf_files: list[Path] = []
    bar = tqdm(steps, desc="export", unit="export", disable=quiet or not steps, dynamic_ncols=True)
    for kind in bar:
        bar.set_postfix_str(kind)
        if quiet:
            print(f"exporting {kind} ...", flush=True)
        if kind == "adapter":
            if not hasattr(model, "peft_config"):
                raise ValueError("export adapter: the model has no LoRA adapter (full fine-tuning); export merged "
                                 "weights instead")
            path = model.save_pretrained_merged(out / "adapter", tokenizer, save_method="lora")
            made.append(_record("adapter", path))
        elif kind == "merged":
            path = model.save_pretrained_merged(out / "merged", tokenizer, save_method="merged_16bit")
            made.append(_record("merged", path))
        elif kind == "gguf":
            gguf_files = model.save_pretrained_gguf(out / "gguf", tokenizer, quantization_method=gguf,
                                                    write_modelfile=False)
            made += [_record(f"gguf {p.name.split('.')[-2].lower()}", p) for p in gguf_files]
        else:
            if not gguf_files:
                raise ValueError("export ollama: a Modelfile points at a GGUF file; ask for a GGUF type too "
                                 "(--gguf q8_0 / export.gguf: [q8_0])")
            path = write_ollama_modelfile(out / "gguf" / "Modelfile", gguf_files[0], tokenizer)
            made.append(_record("ollama Modelfile", path))
    bar.close()
    return made


def _record(kind: str, path: Path) -> dict[str, Any]:
    path = Path(path)
    return {"kind": kind, "path": str(path), "bytes": folder_size(path)}


# ---- fasttune export SOURCE ---------------------------------------------------------------------------------------
LOADS: tuple[str, ...] = ("auto", "4bit", "8bit", "16bit")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="a run folder (fasttune train), an adapter folder or a model folder")
    p.add_argument("--adapter", action="store_true", help="(re)write the LoRA adapter to OUT/adapter")
    p.add_argument("--merged", action="store_true", help="merged 16-bit safetensors in OUT/merged")
    p.add_argument("--gguf", default="", metavar="TYPES",
                   help="comma-separated GGUF types into OUT/gguf, e.g. q4_k_m,q8_0 (" + ", ".join(GGUF_TYPES) + ")")
    p.add_argument("--ollama", action="store_true", help="an Ollama Modelfile beside the first GGUF file")
    p.add_argument("--out", help="where to write (default: the run folder, else SOURCE-export)")
    p.add_argument("--load", choices=LOADS, default="auto",
                   help="how to load the base: auto = as the run trained it (16bit outside a run folder)")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="compute dtype (default: the run's, else auto)")
    p.add_argument("--quiet", action="store_true", help="plain log lines instead of progress bars")


def resolve_source(source: str) -> tuple[Path, Path | None, Recipe | None]:
    """(folder to load, run folder or None, the run's recipe or None)."""
    path = Path(source).expanduser().absolute()
    if (path / "recipe.yaml").is_file():
        recipe = load_recipe(path / "recipe.yaml")
        for sub in ("adapter", "merged"):
            if (path / sub).is_dir():
                return path / sub, path, recipe
        checkpoint = get_last_checkpoint(str(path / "checkpoints")) if (path / "checkpoints").is_dir() else None
        if checkpoint is None:
            raise ConfigError(f"source: {source!r} is a run folder with no adapter/, merged/ or checkpoint to export "
                              "from; train it first (or --resume it)")
        return Path(checkpoint), path, recipe
    if (path / "adapter_config.json").is_file() or (path / "config.json").is_file():
        return path, None, None
    raise ConfigError(f"source: {source!r} is not allowed; allowed: a run folder (holding recipe.yaml), an adapter "
                      "folder (adapter_config.json) or a model folder (config.json)")


def load_for_use(source: str, load: str, dtype: str | None) -> tuple[Any, Any, Path | None, Recipe | None]:
    """Load a run/adapter/model folder the way ``export`` and ``chat`` need it: (model, tokenizer, run, recipe)."""
    folder, run, recipe = resolve_source(source)
    if load == "auto":
        trained = recipe.model.quantization if recipe else "16bit"
        load = "16bit" if trained == "full" else trained
    if dtype is None:
        dtype = recipe.model.dtype if recipe else "auto"
    max_len = recipe.model.max_seq_length if recipe else 2048
    model, tokenizer = FastLanguageModel.from_pretrained(
        str(folder), max_seq_length=max_len, dtype=None if dtype == "auto" else dtype, load_in_4bit=load == "4bit",
        load_in_8bit=load == "8bit", load_in_16bit=load == "16bit")
    return model, tokenizer, run, recipe


def export_command(args: argparse.Namespace) -> int:
    gguf = [g.strip().lower() for g in args.gguf.split(",") if g.strip()]
    bad = [g for g in gguf if g not in GGUF_TYPES]
    problems = [f"--gguf: {g!r} is not allowed; allowed: {', '.join(GGUF_TYPES)}" for g in bad]
    if args.ollama and not gguf:
        problems.append("--ollama: a Modelfile points at a GGUF file; allowed only with --gguf TYPES")
    if not plan(args.adapter, args.merged, gguf, args.ollama):
        problems.append("nothing to export; allowed: one or more of --adapter, --merged, --gguf TYPES, --ollama")
    if problems:
        raise RecipeError(problems, "fasttune export")
    model, tokenizer, run, _ = load_for_use(args.source, args.load, args.dtype)
    out = Path(args.out).expanduser().absolute() if args.out else (run or Path(str(Path(args.source).absolute())
                                                                               + "-export"))
    made = run_exports(model, tokenizer, out, args.adapter, args.merged, gguf, args.ollama, args.quiet)
    for item in made:
        print(f"{item['kind']}: {item['path']} ({item['bytes']} bytes)", flush=True)
    return 0
