"""Whether the current forward is a gradient-checkpointing recompute.

Inside a recompute (fasttune's checkpoint re-running one decoder layer during backward) the layer's activations live
only until that layer's backward finishes, so fused blocks may keep intermediates instead of recomputing them a second
time. Outside, they keep only their inputs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar

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
