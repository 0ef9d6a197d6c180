"""Vision SFT benchmark: fasttune vs the plain transformers + peft + TRL stack on a tiny-but-real-shaped Qwen2-VL.

Run (each configuration in its own fresh process; about two minutes on 2 CPU cores):

    python bench/bench_vision.py                         # 3 warm-up + 15 timed steps of batch 4
    python bench/bench_vision.py --steps 20 --modes plain fasttune fasttune_4bit
    # issue #24's realistic run (about 4 minutes on one thread): Qwen2-VL-2B's shape ratios scaled down, pictures of
    # 224x224 to 448x336, answers of 1-12 sentences, two interleaved rounds
    python bench/bench_vision.py --text 2b --data realistic --batch 4 --warmup 2 --steps 6 --threads 1 \
        --dtype bfloat16 --repeat 2

Model: Qwen2-VL built offline by ``fasttune.tiny.vision.build_tiny_vlm`` with a bigger text tower (hidden 256,
4 layers, intermediate 688, 4 heads of 64, 2 KV heads) and its vision tower of depth 2; random weights, seed 0.
``--text 2b``: Qwen2-VL-2B's ratios scaled down (:data:`TEXT_TOWERS` / :data:`VISION_TOWERS`: a tower of 8 blocks of
width 256 = 28% of the 29M weights, as 0.67B of 2.2B released).
Data: 112x112 PIL pictures of coloured shapes (``fasttune.quickstart.vision.draw``), each asked "Describe the
picture." and answered with a sentence; loss on the answers only. Both stacks get the same rows in the same order
(same trainer seed), the same collator (fasttune's ``UnslothVisionDataCollator``: plain Python over the processor;
TRL's own vision collator would train on the whole conversation, not the answers, so the batches would differ), the
same processor (the model's Qwen2VLProcessor without its video part: ``AutoProcessor`` needs torchvision, which has
no wheel for this torch build), LoRA r=16 alpha=16 dropout 0 on the same layers, seeded the same way.

Configurations:
* ``plain``: ``AutoModelForImageTextToText.from_pretrained`` -> ``torch.manual_seed(3407)`` ->
  ``peft.get_peft_model(LoraConfig(target_modules=<fasttune's regex>))`` -> ``trl.SFTTrainer`` with
  ``SFTConfig(gradient_checkpointing=True, ...)``, as a user of those libraries writes it.
* ``fasttune``: the vision notebook: ``FastVisionModel.from_pretrained(load_in_4bit=False)`` ->
  ``FastVisionModel.get_peft_model`` (four switches on, "unsloth" checkpointing) -> ``fasttune.trl.SFTTrainer``.
* ``fasttune_4bit`` (optional): the same with ``load_in_4bit=True`` (QLoRA; its loss differs by quantization).

Figures: tokens/s over the timed steps' wall time (from the end of the last warm-up step to the end of the last step,
data collation included) -- ``tok/s`` counts every non-padding token (image tokens included), ``label tok/s`` only
the tokens carrying a label; peak RSS of the process (``ru_maxrss``) and the training peak over the RSS after the
model was loaded (``VmHWM`` reset through ``/proc/self/clear_refs`` once the model is ready); the step-1 loss, which
must agree between stacks (LoRA B starts at zero, so it checks the forward), and the last loss; ``tok/CPU-s``: tokens
over the process's CPU time of the timed steps, which a neighbour on a shared machine disturbs less than wall time.
Where the time goes: ``bench/profile_vision.py`` (one profiled step of one configuration).
Results go to bench/results/vision-<UTC time>.json and a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import random
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_sft import matmul_flops, save_results  # bench/ is sys.path[0] when run as a script

HERE = Path(__file__).resolve().parent
MODES = ("plain", "fasttune", "fasttune_4bit")
LORA_SEED = 3407  # fasttune's random_state: torch.manual_seed(3407) right before peft.get_peft_model
_ROPE_64 = {"rope_type": "default", "mrope_section": [8, 12, 12], "rope_theta": 10000.0}  # head_dim 64
TEXT_TOWERS = {  # --text: the language tower's shape (the vision tower is the tiny one: depth 2, width 64)
    "tiny": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=64, rope_parameters=_ROPE_64),
    "small": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
                  num_key_value_heads=4, head_dim=64, rope_parameters=_ROPE_64),
    # Qwen2-VL-2B scaled down: its text tower (hidden 1536, 28 layers, MLP 8960 = 5.8x, 12 heads of 128, 2 KV heads)
    # and vision tower (VISION_TOWERS["2b"]) shrunk so that the tower keeps its ~30% of the weights (0.67B of 2.2B
    # released; here 7.7M of 28M), the tied embedding its ~15% of the text tower's (0.23B of 1.54B; here a vocabulary
    # of 8192: 3.1M of 20.6M), and the tower its 4x more positions than image tokens (2x2 merge) -- the tower does
    # most of the work on image-heavy rows, as in the released model
    "2b": dict(hidden_size=384, intermediate_size=2240, num_hidden_layers=6, num_attention_heads=6,
               num_key_value_heads=2, head_dim=64, rope_parameters=_ROPE_64, vocab_size=8192),
}
# --text's vision tower (the family's tiny one where absent); released Qwen2-VL-2B: depth 32, width 1280, 16 heads,
# MLP 4x, quick-GELU
VISION_TOWERS = {"2b": dict(depth=8, embed_dim=256, num_heads=4, mlp_ratio=4)}
# --data realistic: picture sizes (width, height) between 224x224 and 448x336 (64 to 192 image tokens each)
REALISTIC_SIZES = ((224, 224), (280, 224), (336, 252), (336, 336), (392, 280), (448, 336))
FACTS = ("The {shape} is {colour}.", "The rest of the picture is white.", "Nothing else is in the picture.",
         "The {shape} is large and its edges are sharp.", "It is a plain {colour} {shape} on a white picture.",
         "The {shape} covers most of the picture.")
WHERE = ("top left", "top right", "bottom left", "bottom right", "middle")


# ------------------------------------------------------------------------------------------------ data and model
def describe_rows(n: int, seed: int, size: int = 112, data: str = "uniform") -> list[dict]:
    """``n`` pictures of one coloured shape, each with "Describe the picture." and a one-sentence answer.

    ``varied``: picture sides drawn from 56-224 pixels (Qwen2-VL keeps each image's size, so 4 to 64 image tokens)
    and answers of one to four sentences, as real captioning/OCR data varies; ``realistic``: pictures from 224x224 to
    448x336 (:data:`REALISTIC_SIZES`) and answers of one to twelve sentences; ``uniform``: every row the same shape."""
    from fasttune.quickstart.vision import COLOURS, SHAPES, conversation, draw

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        width, height = rng.choice(REALISTIC_SIZES) if data == "realistic" else (0, 0)
        size = rng.choice((56, 112, 168, 224)) if data == "varied" else max(width, height) or size
        shape, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
        image = draw(shape, colour, rng, size)
        box = image.convert("L").point(lambda v: v < 250).getbbox() or (0, 0, size, size)
        cx, cy = (box[0] + box[2]) / 2 / size, (box[1] + box[3]) / 2 / size
        where = ("middle" if abs(cx - 0.5) < 0.1 and abs(cy - 0.5) < 0.1
                 else f"{'top' if cy < 0.5 else 'bottom'} {'left' if cx < 0.5 else 'right'}")
        answer = f"A {colour} {shape} in the {where} of a white picture."
        if data == "realistic":  # the square drawing stretched to the picture's size: same place, same answer
            image = image.resize((width, height))
        if data == "varied":
            answer = " ".join([answer] + [f"The {shape} is {colour}; the rest of the picture is white."]
                              * rng.randint(0, 3))
        elif data == "realistic":
            answer = " ".join([answer] + [rng.choice(FACTS).format(shape=shape, colour=colour)
                                          for _ in range(rng.randint(0, 11))])
        rows.append({"messages": conversation(image, "Describe the picture.", answer)})
    return rows


def build_model(folder: Path, text: str = "tiny") -> Path:
    """``build_tiny_vlm("qwen2_vl", ...)`` with the bigger text tower, and the vision merger's output widened to it."""
    from fasttune.quickstart.vision import COLOURS, SHAPES
    from fasttune.tiny.vision import build_tiny_vlm

    words = [f"A {c} {s} in the {w} of a white picture. Describe the picture."
             for c in COLOURS for s in SHAPES for w in WHERE]
    words += [fact.format(shape=s, colour=c) for fact in FACTS for c in COLOURS for s in SHAPES]
    build_tiny_vlm("qwen2_vl", folder, seed=0, extra_texts=words * 2, vision_overrides=VISION_TOWERS.get(text),
                   **TEXT_TOWERS[text])
    config = folder / "processor_config.json"  # pictures up to 448x448 keep their size (REALISTIC_SIZES)
    settings = json.loads(config.read_text())
    settings["image_processor"]["size"]["longest_edge"] = max(settings["image_processor"]["size"]["longest_edge"],
                                                              448 * 448)
    config.write_text(json.dumps(settings, indent=2))
    return folder


# ----------------------------------------------------------------------------------------------- worker (one config)
def rss_kib(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+)", text, re.M).group(1))


def lora_targets(model_dir: str) -> str:
    """The regex fasttune's four switches give for this model (peft matches it against full module names)."""
    import torch

    from fasttune import FastVisionModel

    model, _ = FastVisionModel.from_pretrained(model_dir, load_in_4bit=False, dtype=torch.float32)
    model = FastVisionModel.get_peft_model(model, finetune_vision_layers=True, finetune_language_layers=True,
                                           finetune_attention_modules=True, finetune_mlp_modules=True)
    return model.peft_config["default"].target_modules


def load(opts: argparse.Namespace):
    """``(model, processor)`` for the configuration ``opts.mode``."""
    import torch

    dtype = getattr(torch, opts.dtype)
    if opts.mode == "plain":
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForImageTextToText

        from fasttune.vision.processor import load_processor  # AutoProcessor without torchvision fails (docstring)

        model = AutoModelForImageTextToText.from_pretrained(opts.model_dir, dtype=dtype)
        torch.manual_seed(LORA_SEED)
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, bias="none",
                                                 target_modules=opts.targets, task_type="CAUSAL_LM"))
        return model, load_processor(opts.model_dir)
    from fasttune import FastVisionModel

    model, processor = FastVisionModel.from_pretrained(opts.model_dir, load_in_4bit=opts.mode == "fasttune_4bit",
                                                       dtype=dtype, max_seq_length=2048)
    model = FastVisionModel.get_peft_model(model, finetune_vision_layers=True, finetune_language_layers=True,
                                           finetune_attention_modules=True, finetune_mlp_modules=True, r=16,
                                           lora_alpha=16, lora_dropout=0, random_state=LORA_SEED)
    if model.peft_config["default"].target_modules != opts.targets:
        raise RuntimeError("the fasttune model adapts other layers than the plain one would")
    return model, processor


def build_trainer(opts: argparse.Namespace, model, processor, workdir: str):
    import trl
    from datasets import Dataset
    from transformers import TrainerCallback

    import fasttune.trl
    from fasttune.vision import UnslothVisionDataCollator

    fasttune_stack = opts.mode != "plain"
    config_class, trainer_class = ((fasttune.trl.SFTConfig, fasttune.trl.SFTTrainer) if fasttune_stack
                                   else (trl.SFTConfig, trl.SFTTrainer))
    # the plain user turns checkpointing on in the config; the notebook leaves it to get_peft_model ("unsloth")
    hand_set = {} if fasttune_stack else {"gradient_checkpointing": True}
    args = config_class(
        output_dir=workdir, max_steps=opts.warmup + opts.steps, per_device_train_batch_size=opts.batch,
        learning_rate=2e-4, lr_scheduler_type="linear", warmup_steps=0, logging_steps=1, seed=opts.seed,
        report_to="none", save_strategy="no", disable_tqdm=True, dataloader_num_workers=0, use_cpu=True,
        bf16=opts.dtype == "bfloat16", remove_unused_columns=False, dataset_text_field="",
        dataset_kwargs={"skip_prepare_dataset": True}, max_length=2048, **hand_set,
    )
    rows = describe_rows((opts.warmup + opts.steps) * opts.batch, opts.seed, data=opts.data)
    # fasttune's collator packs rows padding-free where the family allows it (its default); the plain stack gets the
    # padded batches a plain collator makes (same rows, same labels)
    plain_batches = {} if fasttune_stack else {"padding_free": False}
    if plain_batches and "padding_free" not in inspect.signature(UnslothVisionDataCollator).parameters:
        plain_batches = {}  # a collator without packing pads anyway
    collator = UnslothVisionDataCollator(model, processor, **plain_batches)
    counts: list[tuple[int, int]] = []

    def counting(examples):
        batch = collator(examples)
        mask = batch.get("attention_mask")
        real = int(mask.sum()) if mask is not None else batch["input_ids"].numel()  # packed rows have no padding
        counts.append((real, int((batch["labels"][..., 1:] != -100).sum())))
        return batch

    # a datasets.Dataset for both (trl.SFTTrainer refuses a list; pictures are stored as PNG bytes, decoded by the
    # collator in both stacks)
    trainer = trainer_class(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=processor,
                            data_collator=counting)
    ends: list[float] = []
    cpu_ends: list[float] = []  # the process's CPU time: what the step cost, less a neighbour's share of the cores

    class Clock(TrainerCallback):
        def on_step_end(self, *a, **k):
            ends.append(time.perf_counter())
            cpu_ends.append(time.process_time())

    trainer.add_callback(Clock())
    trainer.fasttune_bench_cpu_ends = cpu_ends
    return trainer, counts, ends


def checkpointing(model) -> str:
    """Which checkpointing the model's layers ran with: fasttune's remembered mode, or transformers' flag."""
    from fasttune.lora.unwrap import base_model
    from fasttune.patch.checkpointing import remembered_mode

    base = base_model(model)
    mode = remembered_mode(base)
    return str(mode) if mode is not None else str(getattr(base, "is_gradient_checkpointing", None))


def run_worker(opts: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(opts.threads)
    with tempfile.TemporaryDirectory() as workdir:
        model, processor = load(opts)
        trainer, counts, ends = build_trainer(opts, model, processor, workdir)
        rss_loaded = rss_kib("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # restart VmHWM: the peak from here on is training's
        trainer.train()
        train_hwm = rss_kib("VmHWM")
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    timed = range(opts.warmup, opts.warmup + opts.steps)
    seconds = ends[-1] - ends[opts.warmup - 1]
    tokens = sum(counts[i][0] for i in timed)
    labels = sum(counts[i][1] for i in timed)
    return {
        "mode": opts.mode, "dtype": opts.dtype, "steps": opts.steps, "warmup": opts.warmup, "batch": opts.batch,
        "tokens_per_s": tokens / seconds, "label_tokens_per_s": labels / seconds, "timed_s": seconds,
        # robust to a neighbour's burst on a shared machine: the timed steps' median step time
        "tokens_per_cpu_s": tokens / (trainer.fasttune_bench_cpu_ends[-1] - trainer.fasttune_bench_cpu_ends[opts.warmup - 1]),
        "median_step_s": statistics.median(ends[i] - ends[i - 1] for i in timed),
        "tokens_per_s_median": tokens / (opts.steps * statistics.median(ends[i] - ends[i - 1] for i in timed)),
        "tokens": [c[0] for c in counts[:len(ends)]], "label_tokens": [c[1] for c in counts[:len(ends)]],
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "loaded_rss_gib": rss_loaded / 2**20, "train_peak_over_loaded_gib": (train_hwm - rss_loaded) / 2**20,
        "loss_step1": losses[0], "loss_last": losses[-1], "losses": losses, "target_modules": model.peft_config["default"].target_modules,
        "config_gradient_checkpointing": trainer.args.gradient_checkpointing, "checkpointing": checkpointing(model),
        "step_s": [round(b - a, 3) for a, b in zip(ends, ends[1:])],
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }


# ------------------------------------------------------------------------------------------- orchestrator and table
def machine(threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    names = [ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name")]
    flags = next((ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), [])
    return {"cpu": names[0] if names else platform.processor(), "cores": os.cpu_count(), "torch": torch.__version__,
            "bf16_flags": [f for f in ("avx512_bf16", "amx_bf16", "amx_tile") if f in flags],
            "gflops_fp32": matmul_flops("float32") / 1e9, "gflops_bf16": matmul_flops("bfloat16") / 1e9,
            "load_avg": os.getloadavg(), "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime())}


def spawn(mode: str, opts: argparse.Namespace) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--mode", mode, "--model-dir", opts.model_dir,
           "--steps", str(opts.steps), "--warmup", str(opts.warmup), "--batch", str(opts.batch),
           "--threads", str(opts.threads), "--seed", str(opts.seed), "--dtype", opts.dtype,
           "--targets", opts.targets, "--data", opts.data, "--text", opts.text]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(HERE.parent)}
    load_before = os.getloadavg()[0]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"mode": mode, "error": proc.stderr[-3000:]}
    return {**json.loads(lines[-1]), "load_avg_1m": [load_before, os.getloadavg()[0]]}


def table(results: list[dict]) -> str:
    out = ["| round | stack | tok/s | x plain | tok/s (median step) | x plain | tok/CPU-s | x plain | label tok/s "
           "| peak RSS GiB | x plain | train peak over loaded GiB | x plain | loss step 1 | last loss |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            out.append(f"| {r.get('round', 1)} | {r['mode']} | ERROR: {r['error'].strip().splitlines()[-1][:100]} |")
            continue
        base = next((b for b in results if b["mode"] == "plain" and "error" not in b
                     and b.get("round", 1) == r.get("round", 1)), None)  # the plain run of the same round

        def ratio(key: str, r=r, base=base) -> str:
            return f"{r[key] / base[key]:.2f}" if base and base[key] else "-"

        out.append(f"| {r.get('round', 1)} | {r['mode']} | {r['tokens_per_s']:.0f} | {ratio('tokens_per_s')} | "
                   f"{r['tokens_per_s_median']:.0f} | {ratio('tokens_per_s_median')} | "
                   f"{r['tokens_per_cpu_s']:.0f} | {ratio('tokens_per_cpu_s')} | "
                   f"{r['label_tokens_per_s']:.1f} | {r['peak_rss_gib']:.3f} | {ratio('peak_rss_gib')} | "
                   f"{r['train_peak_over_loaded_gib']:.3f} | {ratio('train_peak_over_loaded_gib')} | "
                   f"{r['loss_step1']:.4f} | {r['loss_last']:.4f} |")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=MODES, default="fasttune")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=["plain", "fasttune"])
    parser.add_argument("--targets", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", default=None, help="a built model folder (default: build one in a temp dir)")
    parser.add_argument("--steps", type=int, default=15, help="timed steps (default 15)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--text", choices=sorted(TEXT_TOWERS), default="tiny", help="language tower shape")
    parser.add_argument("--data", choices=["uniform", "varied", "realistic"], default="uniform",
                        help="uniform: 112-pixel pictures, one-sentence answers; varied: 56-224 pixels, 1-4 sentences; "
                             "realistic: 224x224 to 448x336 pixels, 1-12 sentences")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=1, help="rounds of all --modes, interleaved (default 1)")
    parser.add_argument("--seed", type=int, default=3407)
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default=None,
                        help="default: bfloat16 where the CPU has native bf16 and it measures faster, else float32")
    opts = parser.parse_args()
    if opts.warmup < 1 or opts.steps < 1:
        parser.error(f"--warmup {opts.warmup} / --steps {opts.steps}: both must be at least 1")
    if opts.worker:
        print(json.dumps(run_worker(opts)), flush=True)
        return
    info = machine(opts.threads)
    if opts.dtype is None:
        opts.dtype = "bfloat16" if info["bf16_flags"] and info["gflops_bf16"] > 1.2 * info["gflops_fp32"] else "float32"
    print(f"# {info['cpu']}, {info['cores']} cores, {opts.threads} threads, {opts.dtype}, torch {info['torch']}, "
          f"bf16 flags {info['bf16_flags'] or 'none'}, matmul fp32 {info['gflops_fp32']:.0f} / bf16 "
          f"{info['gflops_bf16']:.0f} GFLOP/s, load average {info['load_avg'][0]:.2f}, {info['date_utc']} UTC",
          flush=True)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        if opts.model_dir is None:
            opts.model_dir = str(build_model(Path(tmp) / "qwen2_vl", opts.text))
        opts.targets = lora_targets(opts.model_dir)
        for mode, round_ in [(m, i + 1) for i in range(opts.repeat) for m in opts.modes]:  # interleaved rounds
            results.append({**spawn(mode, opts), "round": round_})
            r = results[-1]
            print(json.dumps({k: v for k, v in r.items() if k not in ("losses", "tokens", "label_tokens",
                                                                       "target_modules", "step_s")}), flush=True)
    ok = [r for r in results if "error" not in r]
    tower = TEXT_TOWERS[opts.text]
    vision = VISION_TOWERS.get(opts.text, {"depth": 2, "embed_dim": 64})
    print(f"\nQwen2-VL (text {tower['hidden_size']}x{tower['num_hidden_layers']}, vision {vision['embed_dim']}x"
          f"{vision['depth']}), {opts.batch} "
          f"pictures per step ({opts.data}), {opts.warmup} warm-up + {opts.steps} timed steps, {opts.dtype}, "
          f"{opts.threads} threads\n")
    print(table(results))
    plain = next((r for r in ok if r["mode"] == "plain"), None)
    for r in ok:
        if plain and r["mode"] != "plain":
            same = r["tokens"] == plain["tokens"] and r["label_tokens"] == plain["label_tokens"]
            diff = abs(r["loss_step1"] - plain["loss_step1"])
            print(f"\n{r['mode']} vs plain: step-1 loss {r['loss_step1']:.6f} vs {plain['loss_step1']:.6f} "
                  f"(diff {diff:.2e}, {'within' if diff <= 1e-3 else 'NOT within'} 1e-3); same batches: {same}; same LoRA "
                  f"targets: {r['target_modules'] == plain['target_modules']}; trainable {r['trainable']} vs "
                  f"{plain['trainable']}")
    for r in ok:
        print(f"{r['mode']}: checkpointing {r['checkpointing']} (config gradient_checkpointing="
              f"{r['config_gradient_checkpointing']}); step times {r['step_s']}")
    print(f"load average (1 min) around each run: {[(r['mode'], r.get('load_avg_1m')) for r in results]}")
    save_results("vision", info, opts, results)


if __name__ == "__main__":
    main()
