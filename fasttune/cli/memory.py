"""Process memory as the run reports it and the estimator predicts it: resident set size (RSS), in bytes.

``fasttune train`` takes the baseline right before the model loads (every library already imported), resets the
kernel's high-water mark there (Linux ``/proc/self/clear_refs``), and reports the peak RSS *increase* over that
baseline at the end of training: what loading, data and training added to the process.
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path

_STATUS = Path("/proc/self/status")


def _status_kib(key: str) -> int | None:
    if not _STATUS.is_file():
        return None
    for line in _STATUS.read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return None


def current_rss() -> int:
    """Resident memory of this process now (bytes); the lifetime peak where the OS does not say (not Linux)."""
    kib = _status_kib("VmRSS")
    return kib * 1024 if kib is not None else peak_rss()


def peak_rss() -> int:
    """Peak resident memory of this process since start or the last ``reset_peak`` (bytes)."""
    kib = _status_kib("VmHWM")
    if kib is not None:
        return kib * 1024
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss if sys.platform == "darwin" else maxrss * 1024


def reset_peak() -> bool:
    """Reset the peak to the current RSS (Linux >= 4.0); False where the OS cannot, and the peak stays lifetime."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def gib(n: float) -> str:
    return f"{n / 2**30:.3f} GiB" if abs(n) >= 2**30 else f"{n / 2**20:.1f} MiB"


def _libc_trim():
    """glibc's ``malloc_trim``, or None where the C library is not glibc."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name is None:
        return None
    trim = getattr(ctypes.CDLL(name), "malloc_trim", None)
    if trim is not None:
        trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


_TRIM = _libc_trim() if sys.platform.startswith("linux") else None


def release_freed() -> bool:
    """Give the heap's free pages back to the OS (glibc ``malloc_trim(0)``: interior free pages included); False
    where the C library cannot."""
    if _TRIM is None:
        return False
    _TRIM(0)
    return True
