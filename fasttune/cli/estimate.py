"""``fasttune estimate recipe.yaml``: peak training memory and tokens/s, from the model config alone.

What it predicts: the peak of *live* memory a ``fasttune train`` run adds above the process baseline taken right
before the model loads (what ``report.md`` measures as RSS on CPU). It reads only the config (``AutoConfig`` of a
folder or Hub id, or the tiny model's), never the weights, and counts bytes for the worst-case micro-batch (every row
``max_seq_length`` tokens; padding-free batches hold no padding). w = bytes of the compute dtype.

- checkpoint pages: on CPU the safetensors file is memory-mapped and read whole (by quantization at load, by the
  first forward otherwise), so its pages count in RSS: parameters x bytes per parameter in the file.
- weights: 4-bit linear layers 0.5 byte + NF4 block scales (1 byte per 64, double-quantized: + 4 bytes per 64 x 256)
  per parameter; 8-bit 1 byte + a 4-byte scale per row; embeddings, norms and the LM head stay in w bytes. A 16-bit
  (or full) load whose dtype equals the file's trains on the mapped pages themselves (no second copy).
- LoRA: adapters are fp32: 4 (weight) + 4 (gradient) + 8 (AdamW's two moments) bytes per parameter (SGD and
  Adafactor: no moments counted, 8-bit AdamW: 2 bytes).
- full fine-tuning: AdamW moments (2 x w per parameter), then the larger of all gradients (w per parameter, plus two
  temporaries of the largest tensor in the optimizer step) and the activation peak: gradients fill up as backward
  frees the activations.
- activations, N = batch x max_seq_length tokens, the larger of two phases. Backward of a layer: with checkpointing
  ("unsloth"/true) every layer's input (N x hidden) plus one recomputed layer's tensors (3 hidden + 3 q + 3 kv +
  2 intermediate per token: norms, residual, q/k/v and their rotated copies, attention output, gate and up), plus the
  fused MLP's backward (5 intermediate + 3 hidden: act(g)*u, its gradient, dg, du, the activation's own buffer; dy
  and the two dx parts); without checkpointing every layer's tensors. The loss phase: the kept inputs, the fused
  cross-entropy's fp32 grad(h) (N x hidden), the final norm output and one chunk of logits, their gradient and an fp32
  copy (3 x chunk x vocab x 4 bytes).
- dequantization: a 4/8-bit linear layer is dequantized one at a time: the largest one, w bytes per value.
- runtime: torch/oneDNN/bitsandbytes/TRL working memory that does not grow with the model: 38 MiB on CPU, measured
  once as the peak of the quickstart's tiny model (4-bit, batch 2 x 128 tokens of long text rows: 66.5 MiB) minus
  this formula's 29.0 MiB for it; not fitted to the configurations the estimate is checked on.

"Live" memory: glibc keeps freed blocks smaller than its (self-raising, up to 32 MiB) mmap threshold in the heap, so
with the default allocator a CPU run's RSS also holds freed activation buffers, up to about twice the live peak in
LoRA runs (README, "Command line"). ``MALLOC_MMAP_THRESHOLD_=131072 MALLOC_TRIM_THRESHOLD_=0`` (environment, set
before Python starts) makes glibc return them at once: RSS then follows live memory, at about a third fewer
tokens/s on CPU; ``tests/cli/test_estimate.py`` measures that way, the analogue of comparing with
``torch.cuda.max_memory_allocated`` rather than the caching allocator's reserved memory on CUDA.

tokens/s: 6 x parameters FLOPs per token (forward + backward), 8 x with recomputation, over this device's measured
matmul rate (a 0.2 s benchmark in the compute dtype): an upper bound, small models run far below it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig

from fasttune.device import resolve_dtype
from fasttune.gguf_source import gguf_in
from fasttune.patch.loss import loss_chunk_size
from fasttune.real_models import REAL_MODELS, real_model

from .memory import gib
from .recipe import TINY_MODELS, Recipe, load_recipe

RUNTIME_BYTES = 38 * 2**20
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
    def linear_params(self) -> int:
        return self.layers * sum(a * b for a, b in self.linears.values())

    @property
    def other_params(self) -> int:
        """Embeddings, LM head (when untied) and norms."""
        return self.vocab * self.hidden * (1 if self.tied else 2) + (2 * self.layers + 1) * self.hidden


def model_shape(recipe: Recipe) -> Shape:
    config = _config(recipe).get_text_config()
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    file_dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    file_dtype = resolve_dtype(file_dtype) if isinstance(file_dtype, str) else file_dtype
    return Shape(config.vocab_size, config.hidden_size, config.num_hidden_layers, config.intermediate_size,
                 heads * head_dim, kv * head_dim, bool(getattr(config, "tie_word_embeddings", False)),
                 _FILE_DTYPE_BYTES.get(file_dtype, 4))


def _config(recipe: Recipe) -> Any:
    if recipe.model.name in TINY_MODELS:
        from fasttune.quickstart import quickstart_tokenizer
        from fasttune.tiny import tiny_config

        return tiny_config("llama", quickstart_tokenizer())
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


def memory_parts(recipe: Recipe, shape: Shape, on_cpu: bool = True) -> dict[str, int]:
    """Bytes of each part of the peak (see the module docstring)."""
    q = recipe.model.quantization
    w = torch.finfo(resolve_dtype(None if recipe.model.dtype == "auto" else recipe.model.dtype)).bits // 8
    n_lin, n_other = shape.linear_params, shape.other_params
    parts: dict[str, int] = {}
    parts["checkpoint pages (mmap)"] = (n_lin + n_other) * shape.file_bytes if on_cpu else 0
    if q == "4bit":
        parts["weights"] = int(n_lin * (0.5 + 1 / 64 + 4 / (64 * 256))) + n_other * w
    elif q == "8bit":
        rows = shape.layers * sum(b for _, b in shape.linears.values())
        parts["weights"] = n_lin + 4 * rows + n_other * w
    else:
        parts["weights"] = 0 if on_cpu and w == shape.file_bytes else (n_lin + n_other) * w
    moments = {"sgd": 0, "adamw_8bit": 2, "paged_adamw_8bit": 2, "adafactor": 0}.get(recipe.train.optim, 8)
    activations = activation_peak(recipe, shape, w)
    if q == "full":
        params = n_lin + n_other
        parts["optimizer moments"] = params * moments * w // 4
        # gradients fill up as backward goes while activations are freed: the peak is the larger of the two moments
        largest = max(shape.vocab * shape.hidden, max(a * b for a, b in shape.linears.values()))
        parts["gradients, or activations if larger"] = max(params * w + 2 * largest * w, activations)
    else:
        parts["LoRA + gradients + optimizer"] = _lora_params(shape, recipe.lora.r, recipe.lora.target_modules) * (
            4 + 4 + moments)
        parts["activations"] = activations
    if q in ("4bit", "8bit"):
        parts["dequantized layer"] = max(a * b for a, b in shape.linears.values()) * w
    parts["runtime"] = RUNTIME_BYTES
    return parts


def activation_peak(recipe: Recipe, shape: Shape, w: int) -> int:
    """Bytes of activations at the peak of a micro-batch: the larger of the loss phase and a layer's backward."""
    n = recipe.train.batch_size * recipe.model.max_seq_length
    h, i, q, kv = shape.hidden, shape.intermediate, shape.q_dim, shape.kv_dim
    layer = n * (3 * h + 3 * q + 3 * kv + 2 * i) * w  # a layer's tensors, kept until its backward ends
    mlp_backward = n * (5 * i + 3 * h) * w  # act(g)*u, its gradient, dg, du, the activation's own; dy, dx_g, dx_u
    grad_h = n * h * 4  # the fused loss's gradient w.r.t. the last hidden states, fp32, kept from forward
    kept = shape.layers * layer if recipe.train.gradient_checkpointing is False else shape.layers * n * h * w + layer
    backward = kept + mlp_backward + grad_h
    loss = kept - (0 if recipe.train.gradient_checkpointing is False else layer) + grad_h + n * h * w + (
        3 * min(loss_chunk_size(shape.vocab), n) * shape.vocab * 4)
    return max(backward, loss)


def matmul_flops(dtype: torch.dtype, seconds: float = 0.2) -> float:
    """This device's measured matmul rate (FLOP/s) in ``dtype``."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    a = torch.randn(512, 512, dtype=dtype, device=device)
    b = torch.randn(512, 512, dtype=dtype, device=device)
    runs, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        runs += 1
    if device == "cuda":
        torch.cuda.synchronize()
    return 2 * 512**3 * runs / (time.perf_counter() - start)


def tokens_per_second(recipe: Recipe, shape: Shape) -> float:
    params = shape.linear_params + shape.other_params
    flops = (8 if recipe.train.gradient_checkpointing is not False else 6) * params
    dtype = resolve_dtype(None if recipe.model.dtype == "auto" else recipe.model.dtype)
    return matmul_flops(dtype) / flops


def estimate(recipe: Recipe) -> dict[str, Any]:
    shape = model_shape(recipe)
    parts = memory_parts(recipe, shape, on_cpu=not torch.cuda.is_available())
    return {"parts": parts, "total": sum(parts.values()), "tokens_per_s": tokens_per_second(recipe, shape),
            "params": shape.linear_params + shape.other_params}


def estimate_command(recipe_path: str | None, overrides: list[str]) -> int:
    recipe = load_recipe(recipe_path, overrides)
    result = estimate(recipe)
    m, t = recipe.model, recipe.train
    print(f"model {m.name}: {result['params'] / 1e6:.1f}M parameters, {m.quantization}, dtype {m.dtype}, "
          f"batch {t.batch_size} x {m.max_seq_length} tokens, checkpointing {t.gradient_checkpointing}")
    width = max(len(k) for k in result["parts"])
    for name, size in result["parts"].items():
        print(f"  {name.ljust(width)}  {gib(size):>12}")
    print(f"  {'peak above the pre-load baseline'.ljust(width)}  {gib(result['total']):>12}")
    print(f"  {'tokens/s (predicted)'.ljust(width)}  {result['tokens_per_s']:>12.0f}")
    print(f"estimate_bytes={result['total']}")
    return 0
