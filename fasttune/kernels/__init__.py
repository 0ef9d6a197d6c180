"""fasttune's fast ops: each a ``torch.autograd.Function`` with a plain-PyTorch reference beside it.

Public functions pick an implementation per call from the input's device (see ``fasttune.kernels.dispatch``):
Triton kernels on CUDA when ``triton`` is installed, a memory-saving torch path on CPU (and on CUDA without triton),
the reference elsewhere. ``use_backend("reference" | "torch" | "triton")`` or ``FASTTUNE_KERNEL_BACKEND`` force one.
On CPU the torch path's inner maths can be compiled with ``torch.compile`` (``FASTTUNE_COMPILE=1`` or
``use_compile(True)``; off by default, measured: see ``fasttune.kernels.compiling``).

    rms_norm(x, weight, eps, offset=False)           x*w, or Gemma's x*(1+w); fp32 statistics
    apply_rope(q, k, cos, sin) -> (q, k)             rotate-half RoPE from per-token cos/sin (b, s, d)
    swiglu(gate, up)                                 silu(gate) * up
    geglu(gate, up, approximate="tanh")              gelu(gate) * up, "tanh" or "none"
    fused_linear_cross_entropy(hidden, weight, labels, *, ignore_index=-100, softcap=None,
                               num_items_in_batch=None, chunk_size=1024, bias=None)
"""

from __future__ import annotations

from fasttune.kernels.compiling import compile_enabled, use_compile
from fasttune.kernels.cross_entropy import fused_linear_cross_entropy
from fasttune.kernels.dispatch import BACKENDS, select_backend, triton_available, use_backend
from fasttune.kernels.rms_norm import rms_norm
from fasttune.kernels.rope import apply_rope
from fasttune.kernels.swiglu import geglu, swiglu

__all__ = [
    "BACKENDS",
    "apply_rope",
    "compile_enabled",
    "fused_linear_cross_entropy",
    "geglu",
    "rms_norm",
    "select_backend",
    "swiglu",
    "triton_available",
    "use_backend",
    "use_compile",
]
