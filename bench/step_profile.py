"""Where a training step's time goes, and how much of the machine it uses (bench_sft.py ``--profile``).

``StepProfiler`` is a ``TrainerCallback`` that runs ``torch.profiler`` over the steps after the warm-up and sorts every
operator's own (self) CPU time into one category, decided first by the enclosing scope, then by the operator:

* ``optimizer``: anything under ``Optimizer.step`` / ``zero_grad``;
* ``loss``: anything under fasttune's fused loss (``FusedLinearCrossEntropyFunction`` and its backward) or TRL's
  chunked LM head (``ChunkedLogProbFunction``), or a cross-entropy / log-softmax operator;
* ``recompute``: anything re-run inside a checkpointed layer's backward (fasttune's ``OffloadedCheckpointBackward``;
  torch's non-reentrant checkpoint has no scope, so the plain stack's recompute is counted under its operators);
* ``attention``: scaled-dot-product / flash attention operators, forward and backward;
* ``matmul``: ``mm`` / ``addmm`` / ``bmm`` / ``grouped_mm``, and ``lora`` for the products whose smallest
  dimension is the LoRA rank;
* ``norms, activations, rope``: compiled regions and the element-wise maths they replace;
* ``copies, element-wise``: the other operators (copy, add, mul, cat, index, ...);
* ``Python and framework``: the step's wall time that no operator accounts for (module calls, hooks, autograd
  bookkeeping, the Trainer).

Data collation happens outside the timed step (the dataloader fetches before ``on_step_begin``); it is timed apart.

``sustained_matmul_rate`` measures the machine's matmul rate **at the model's own shapes and dtype**: every distinct
linear shape of the model, forward (``x W^T``) and input-gradient (``dY W``) products, at the step's token count.
``model_flops`` counts the useful work of a LoRA step (no recompute): frozen linear layers forward + input gradient
(4 x params per token), LoRA factors forward + both gradients (6 x params), causal attention per segment
(6 x n^2 x heads x head_dim per layer), and the head only at labelled positions (4 x hidden x vocab). The same count
is used for every configuration, so utilisation ratios equal speed ratios; the absolute figure says how close to the
machine's matmul limit a configuration runs.
"""

from __future__ import annotations

import time
from collections import defaultdict

import torch
from transformers import TrainerCallback

CATEGORIES = ("matmul", "lora", "attention", "loss", "recompute", "norms, activations, rope", "copies, element-wise",
              "optimizer", "Python and framework")
_MATMUL = {"aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::_grouped_mm", "aten::baddbmm"}
_ATTENTION = ("attention", "flash", "sdpa")
_LOSS_SCOPES = ("FusedLinearCrossEntropy", "ChunkedLogProb")  # fasttune's fused loss; TRL's chunked LM head
_LOSS_OPS = ("cross_entropy", "log_softmax", "nll_loss", "logsumexp")
_ELEMENTWISE_MATH = ("silu", "gelu", "rsqrt", "pow", "mean", "sigmoid", "tanh", "Compiled", "compiled", "Torch-Compiled",
                     "CompiledFunction", "RmsNorm", "RMSNorm", "Rope", "SwiGLU", "GeGLU")


def _chain(event) -> list[str]:
    """Names from ``event`` up to the outermost scope (innermost first)."""
    names = []
    while event is not None:
        names.append(event.name)
        event = event.cpu_parent
    return names


def _scope(chain: list[str]) -> str | None:
    """The category an enclosing scope forces (optimizer, loss, recompute), or None."""
    if any(name.startswith("Optimizer.") for name in chain):
        return "optimizer"
    if any(scope in name for name in chain for scope in _LOSS_SCOPES):
        return "loss"
    for i, name in enumerate(chain):
        if "OffloadedCheckpointBackward" in name:
            # inside the checkpoint's backward the layer is first re-run forward, then back-propagated through:
            # only what is not under a nested autograd node is the re-run
            return None if any("evaluate_function" in n for n in chain[:i]) else "recompute"
    return None


def _category(event, rank: int) -> str:
    forced = _scope(_chain(event))
    if forced is not None:
        return forced
    name = event.name
    lower = name.lower()
    if any(k in lower for k in _LOSS_OPS):
        return "loss"
    if any(k in lower for k in _ATTENTION):
        return "attention"
    if name in _MATMUL:
        return "lora" if rank and _is_lora([s for s in (event.input_shapes or [])], rank) else "matmul"
    if any(k in name for k in _ELEMENTWISE_MATH):
        return "norms, activations, rope"
    return "copies, element-wise"


def _is_lora(shapes, rank: int) -> bool:
    """A product with the LoRA rank as one of its three dimensions (m x k @ k x n)."""
    mats = [s for s in shapes if isinstance(s, (list, tuple)) and len(s) >= 2][-2:]  # addmm: (bias, a, b)
    if len(mats) < 2:
        return False
    a, b = mats
    return rank in (a[-2], a[-1], b[-1])


class StepProfiler(TrainerCallback):
    """Profile steps ``first..last`` (0-based, the warm-up excluded) and keep the seconds per category."""

    def __init__(self, first: int = 1, last: int = 2, rank: int = 16):
        self.first, self.last, self.rank = first, last, rank
        self.step = 0
        self.prof = None
        self.wall = 0.0
        self.seconds: dict[str, float] = {}

    def on_step_begin(self, *args, **kwargs):
        if self.first <= self.step <= self.last:
            if self.prof is None:
                self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                                   record_shapes=True)
                self.prof.__enter__()
            self.t0 = time.perf_counter()

    def on_step_end(self, *args, **kwargs):
        if self.first <= self.step <= self.last:
            self.wall += time.perf_counter() - self.t0
            if self.step == self.last:
                self._finish()
        self.step += 1

    def on_train_end(self, *args, **kwargs):
        if self.prof is not None:
            self._finish()

    def _finish(self) -> None:
        prof, self.prof = self.prof, None
        prof.__exit__(None, None, None)
        totals: dict[str, float] = defaultdict(float)
        ops: dict[tuple[str, str], float] = defaultdict(float)
        for event in prof.events():
            cat = _category(event, self.rank)
            totals[cat] += event.self_cpu_time_total / 1e6
            ops[(cat, event.name)] += event.self_cpu_time_total / 1e6
        self.top_ops = [(cat, name, round(t, 4)) for (cat, name), t in sorted(ops.items(), key=lambda kv: -kv[1])[:25]]
        accounted = sum(totals.values())
        totals["Python and framework"] += max(0.0, self.wall - accounted)
        self.seconds = {k: totals.get(k, 0.0) for k in CATEGORIES}
        self.seconds["step wall (profiled)"] = self.wall


def profile_table(profiles: dict[str, dict[str, float]]) -> str:
    """Markdown: one column per configuration, share of the profiled step time per category."""
    names = list(profiles)
    out = ["| category | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for cat in CATEGORIES + ("data collation (outside the step)",):
        cells = []
        for n in names:
            p = profiles[n]
            wall = p.get("step wall (profiled)") or float("nan")
            cells.append(f"{p.get(cat, 0.0):.2f} s ({100 * p.get(cat, 0.0) / wall:.0f}%)")
        out.append(f"| {cat} | " + " | ".join(cells) + " |")
    out.append("| profiled step wall time | " + " | ".join(f"{profiles[n]['step wall (profiled)']:.2f} s"
                                                          for n in names) + " |")
    return "\n".join(out)


# ------------------------------------------------------------------------------------------------- utilisation
def linear_shapes(model: torch.nn.Module) -> dict[tuple[int, int], int]:
    """(in, out) -> count for the frozen decoder linears (LoRA factors and the head excluded)."""
    shapes: dict[tuple[int, int], int] = defaultdict(int)
    head = model.get_output_embeddings()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and "lora_" not in name and module is not head \
                and module.weight is not getattr(head, "weight", None):
            shapes[(module.in_features, module.out_features)] += 1
    return dict(shapes)


def sustained_matmul_rate(model: torch.nn.Module, tokens: int, dtype: torch.dtype, repeats: int = 3) -> float:
    """FLOP/s of the model's own linear products (forward and input gradient) at ``tokens`` rows, in ``dtype``."""
    seconds = float("inf")
    shapes = linear_shapes(model)
    head = model.get_output_embeddings()
    work = list(shapes) + [(head.in_features, head.out_features)]  # one product of each distinct shape
    device = head.weight.device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    tensors = [(torch.randn(tokens, i, dtype=dtype, device=device), torch.randn(o, i, dtype=dtype, device=device),
                torch.randn(tokens, o, dtype=dtype, device=device)) for i, o in work]
    flops = sum(2 * 2 * tokens * i * o for i, o in work)
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        for x, w, dy in tensors:
            x @ w.t()
            dy @ w
        sync()
        seconds = min(seconds, time.perf_counter() - start)
    return flops / seconds


def model_flops(model: torch.nn.Module, real_tokens: int, labelled_tokens: int, segments: list[int]) -> float:
    """Useful FLOPs of one LoRA training pass over ``real_tokens`` (see the module doc; recompute not counted)."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    frozen = sum(i * o * c for (i, o), c in linear_shapes(model).items())
    lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    head = model.get_output_embeddings()
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    attention = 6 * sum(n * n for n in segments) * heads * head_dim * config.num_hidden_layers
    return 4 * frozen * real_tokens + 6 * lora * real_tokens + 4 * head.in_features * head.out_features * \
        labelled_tokens + attention
