"""One-time notes: a warning logged the first time its key is seen in this process (deprecations, ignored options);
and the one third-party line fasttune keeps from users because nothing is wrong (:func:`quiet_kernel_probe`)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

logger = logging.getLogger("fasttune")

_noted: set[str] = set()


def note_once(key: str, message: str, log: logging.Logger = logger) -> None:
    """Log ``message`` as a warning (on ``log``, the "fasttune" logger unless a module's own) the first time ``key`` is
    seen in this process."""
    if key not in _noted:
        _noted.add(key)
        log.warning("fasttune: %s", message)


# bitsandbytes >= 0.50, imported on a CPU with AVX512-BF16, asks the kernels hub for a CPU 4-bit matmul and logs
# "Failed to load CPU gemm_4bit_forward from kernels-community ..." when it cannot have it (offline, or its trust
# check refuses). fasttune replaces that forward with its own exact one (fasttune.quant.layers): nothing is wrong.
KERNEL_PROBE: tuple[str, str] = ("bitsandbytes.backends.cpu.ops", "gemm_4bit_forward from kernels-community")


@contextlib.contextmanager
def quiet_kernel_probe() -> Iterator[None]:
    """Drop bitsandbytes' kernel-probe warning (:data:`KERNEL_PROBE`) while the block runs, and nothing else; the
    logger is left as it was. fasttune imports its dependencies inside it (``fasttune/__init__.py``)."""
    probe_logger = logging.getLogger(KERNEL_PROBE[0])

    def drop(record: logging.LogRecord) -> bool:
        return KERNEL_PROBE[1] not in record.getMessage()

    probe_logger.addFilter(drop)
    try:
        yield
    finally:
        probe_logger.removeFilter(drop)
