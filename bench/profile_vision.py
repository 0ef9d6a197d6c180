"""One profiled training step of bench_vision.py's configurations: where the time and the resident memory go.

Run (one configuration per process, after bench_vision.py built the model folder):

    python bench/profile_vision.py --mode plain --model-dir /tmp/m2b --text 2b --data realistic --threads 1
    python bench/profile_vision.py --mode fasttune --model-dir /tmp/m2b --text 2b --data realistic --threads 1

The step after ``--warmup`` untimed steps runs under ``torch.profiler``; every module of interest is labelled through
forward hooks (``vision.norm``, ``vision.attn``, ``vision.mlp``, ``vision.merger``, ``vision.patch_embed``,
``language``; a label met again during backward is ``recompute.<label>``), so the table gives the forward and
recompute time of each part, the backward's time by autograd function, the optimizer step, and the collation time
measured around the collator. RSS: the resident memory read at every labelled module's end, its highest value and
where it was met. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import collections
import tempfile
import time

import torch
from bench_vision import build_trainer, load, lora_targets, rss_kib  # bench/ is sys.path[0] as a script

LABELS = (("norm1", "vision.norm"), ("norm2", "vision.norm"), ("attn", "vision.attn"), ("mlp", "vision.mlp"))


def label_of(name: str) -> str | None:
    parts = name.split(".")
    if "visual" in parts:
        if parts[-1] == "merger":
            return "vision.merger"
        if parts[-1] == "patch_embed":
            return "vision.patch_embed"
        if len(parts) >= 2 and parts[-2].isdigit() and parts[-3] == "blocks":
            return dict(LABELS).get(parts[-1])
    if parts[-1] == "language_model":
        return "language"
    return None


def attach_labels(model: torch.nn.Module, peaks: dict) -> None:
    stack: list = []

    def pre(module, args, kwargs, label):
        backward = torch._C._current_graph_task_id() != -1
        rf = torch.autograd.profiler.record_function(("recompute." if backward else "") + label)
        rf.__enter__()
        stack.append(rf)

    def post(module, args, kwargs, output, label):
        stack.pop().__exit__(None, None, None)
        rss = rss_kib("VmRSS")
        if rss > peaks["rss"]:
            peaks.update(rss=rss, where=label + (" (backward)" if torch._C._current_graph_task_id() != -1 else ""))

    for name, module in model.named_modules():
        label = label_of(name)
        if label:
            module.register_forward_pre_hook(lambda m, a, k, label=label: pre(m, a, k, label), with_kwargs=True)
            module.register_forward_hook(lambda m, a, k, o, label=label: post(m, a, k, o, label), with_kwargs=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=("plain", "fasttune", "fasttune_4bit"), required=True)
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--text", default="2b")
    parser.add_argument("--data", default="realistic")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=3407)
    parser.add_argument("--dtype", default="bfloat16")
    opts = parser.parse_args()
    opts.steps = 1
    torch.set_num_threads(opts.threads)
    opts.targets = lora_targets(opts.model_dir)
    from transformers import TrainerCallback

    peaks = {"rss": 0, "where": None}
    with tempfile.TemporaryDirectory() as workdir:
        model, processor = load(opts)
        trainer, counts, ends = build_trainer(opts, model, processor, workdir)
        collate = trainer.data_collator
        collate_s: list[float] = []

        def timed(examples):
            t = time.perf_counter()
            out = collate(examples)
            collate_s.append(time.perf_counter() - t)
            return out

        trainer.data_collator = timed
        attach_labels(model, peaks)
        prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
        optimizer_s: list[float] = []

        class Profile(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                if state.global_step == opts.warmup:
                    peaks.update(rss=0, where=None)
                    prof.__enter__()

            def on_pre_optimizer_step(self, args, state, control, **kw):
                optimizer_s.append(time.perf_counter())

            def on_optimizer_step(self, args, state, control, **kw):
                optimizer_s[-1] = time.perf_counter() - optimizer_s[-1]

            def on_step_end(self, args, state, control, **kw):
                if state.global_step == opts.warmup + 1:
                    prof.__exit__(None, None, None)

        trainer.add_callback(Profile())
        trainer.train()
    events = prof.key_averages()
    rows = collections.OrderedDict()
    for e in events:
        if e.key.startswith(("vision.", "language", "recompute.")):
            rows[e.key] = (e.cpu_time_total / 1e3, e.count)
    backward = sorted(((e.key.split(": ")[-1], e.self_cpu_time_total / 1e3) for e in events
                       if e.key.startswith("autograd::engine::evaluate_function")), key=lambda kv: -kv[1])
    total = sum(e.self_cpu_time_total for e in events) / 1e3
    step = ends[opts.warmup] - ends[opts.warmup - 1]
    print(f"# {opts.mode}: step {step * 1e3:.0f} ms (profiled), collation {collate_s[opts.warmup] * 1e3:.0f} ms, "
          f"optimizer {optimizer_s[opts.warmup] * 1e3:.0f} ms, profiled CPU {total:.0f} ms, tokens {counts[opts.warmup]}")
    print("| part | ms (incl. children) | calls |\n|---|---|---|")
    for key, (ms, n) in sorted(rows.items()):
        print(f"| {key} | {ms:.0f} | {n} |")
    print("\n| backward function (self) | ms |\n|---|---|")
    for key, ms in backward[:15]:
        print(f"| {key} | {ms:.0f} |")
    print("\n| op (self) | ms |\n|---|---|")
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:20]:
        print(f"| {e.key} | {e.self_cpu_time_total / 1e3:.0f} |")
    print(f"\nRSS highest at a labelled module's end in the profiled step: {peaks['rss'] / 2**20:.3f} GiB at "
          f"{peaks['where']}; process peak {rss_kib('VmHWM') / 2**20:.3f} GiB")


if __name__ == "__main__":
    main()
