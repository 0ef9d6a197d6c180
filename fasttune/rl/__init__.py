"""Reinforcement learning: ``PatchFastRL``, the rollout engine (``fast_generate``, ``SamplingParams``), LoRA
handles (``save_lora`` / ``load_lora``), reward checks and the GRPO losses. Importing it imports neither TRL nor vLLM.
"""

from __future__ import annotations

from .compat import RL_ALGORITHMS, PatchFastRL
from .engine import generate
from .fast_generate import fast_generate
from .lora import LoRARequest, load_lora, save_lora
from .sampling import SamplingParams

# methods the loader binds on the models it returns (Unsloth's names)
RL_METHODS = {"fast_generate": fast_generate, "save_lora": save_lora, "load_lora": load_lora}

__all__ = ["RL_ALGORITHMS", "RL_METHODS", "LoRARequest", "PatchFastRL", "SamplingParams", "fast_generate",
           "generate", "load_lora", "save_lora"]
