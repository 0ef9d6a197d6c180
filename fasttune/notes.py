"""One-time notes: a warning logged the first time its key is seen in this process (deprecations, ignored options)."""

from __future__ import annotations

import logging

logger = logging.getLogger("fasttune")

_noted: set[str] = set()


def note_once(key: str, message: str) -> None:
    """Log ``message`` as a warning the first time ``key`` is seen in this process."""
    if key not in _noted:
        _noted.add(key)
        logger.warning("fasttune: %s", message)
