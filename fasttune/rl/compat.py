"""Unsloth's ``PatchFastRL``, kept as a checked no-op so RL notebooks port unchanged (fasttune patches instances, never
libraries: nothing here patches anything)."""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger("fasttune")

RL_ALGORITHMS: tuple[str, ...] = ("GRPO", "DPO", "ORPO", "KTO", "CPO", "SIMPO", "PPO", "RLOO", "ONLINE_DPO")


def PatchFastRL(algorithm: str | None = None, FastLanguageModel: Any = None) -> None:  # noqa: N802 (Unsloth's name)
    """Accepted so Unsloth RL notebooks port unchanged; it checks ``algorithm`` and patches nothing.

    fasttune never patches TRL classes: its RL speedups come with the classes a ported notebook imports from
    ``fasttune.trl`` (``GRPOTrainer``: the rollout engine, log-probs from hidden states, exact gradient
    accumulation) and with the methods on the models ``FastLanguageModel`` returns (``fast_generate``,
    ``save_lora``, ``load_lora``).
    """
    if algorithm is not None and str(algorithm).upper() not in RL_ALGORITHMS:
        raise ValueError(f"algorithm: {algorithm!r} is not a known RL algorithm; choose one of {list(RL_ALGORITHMS)}")
    logger.info("fasttune: PatchFastRL(%r) patches nothing; fasttune.trl's trainers carry the fast path", algorithm)
