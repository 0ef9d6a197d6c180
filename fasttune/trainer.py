"""Unsloth-compatible module for trainer helpers: ``from fasttune.trainer import ...``.

Everything lives elsewhere in fasttune; this module only re-exports it under one familiar name.
"""

from fasttune.device import device_args

__all__ = ["device_args"]
