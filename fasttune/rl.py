"""Reinforcement-learning entry points (Unsloth's ``PatchFastRL``)."""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger("fasttune")

RL_ALGORITHMS: tuple[str, ...] = ("GRPO", "DPO", "ORPO", "KTO", "CPO", "SIMPO", "PPO", "RLOO", "ONLINE_DPO")


def PatchFastRL(algorithm: str | None = None, FastLanguageModel: Any = None) -> None:  # noqa: N802 (Unsloth's name)
    """Accepted so Unsloth RL notebooks port unchanged. fasttune never patches TRL classes.

    TRL's trainers take fasttune models as they are; fasttune's own RL speedups (fast rollouts, chunked log-prob
    losses) are not implemented yet, so this call only checks ``algorithm``.
    """
    if algorithm is not None and str(algorithm).upper() not in RL_ALGORITHMS:
        raise ValueError(f"algorithm: {algorithm!r} is not a known RL algorithm; choose one of {list(RL_ALGORITHMS)}")
    logger.info("fasttune: PatchFastRL(%r) changes nothing; TRL trainers are used unpatched", algorithm)
