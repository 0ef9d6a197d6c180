"""Whether the current forward is a gradient-checkpointing recompute.

Inside a recompute (fasttune's checkpoint re-running one decoder layer during backward) the layer's activations live
only until that layer's backward finishes, so fused blocks may keep intermediates instead of recomputing them a second
time. Outside, they keep only their inputs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar

import torch

_RECOMPUTING: ContextVar[bool] = ContextVar("fasttune_recomputing", default=False)


def in_recompute() -> bool:
    """True while fasttune's checkpoint is re-running a layer for its backward."""
    return _RECOMPUTING.get()


@contextlib.contextmanager
def recomputing() -> Iterator[None]:
    """Mark the enclosed forward as a checkpoint recompute."""
    token = _RECOMPUTING.set(True)
    try:
        yield
    finally:
        _RECOMPUTING.reset(token)


class CheckpointScope:
    """What one checkpointed call's first forward keeps for its recompute (see
    :mod:`fasttune.kernels.segment_attention`): ``kept`` in call order, taken back in the same order."""

    __slots__ = ("cursor", "kept")

    def __init__(self) -> None:
        self.kept: list[tuple] = []
        self.cursor = 0

    def take(self, out_shape: torch.Size) -> tuple | None:
        """The next kept entry if its first tensor has ``out_shape`` (else None: the caller computes afresh)."""
        if self.cursor >= len(self.kept) or self.kept[self.cursor][0].shape != out_shape:
            return None
        entry = self.kept[self.cursor]
        self.kept[self.cursor] = ()
        self.cursor += 1
        return entry


_SCOPE: ContextVar[CheckpointScope | None] = ContextVar("fasttune_checkpoint_scope", default=None)


def current_scope() -> CheckpointScope | None:
    """The scope of the checkpointed call running now (its forward or its recompute), or None."""
    return _SCOPE.get()


@contextlib.contextmanager
def checkpoint_scope(scope: CheckpointScope) -> Iterator[None]:
    """Run the enclosed forward (or recompute) of one checkpointed call with ``scope``."""
    token = _SCOPE.set(scope)
    try:
        yield
    finally:
        _SCOPE.reset(token)
