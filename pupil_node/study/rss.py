"""Peak resident memory of this process, resettable on Linux.

``reset_peak()`` writes 5 to ``/proc/self/clear_refs``, which resets the kernel's high-water mark
(``VmHWM``) to the current RSS, so ``peak_bytes()`` then measures one phase (a load, a round)
rather than the whole life of the process. Elsewhere both fall back to ``getrusage``, whose peak
cannot be reset.
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def reset_peak() -> bool:
    """Reset the peak to the current RSS; False where the platform cannot."""
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


def peak_bytes() -> int:
    """The peak RSS since the last ``reset_peak()`` (or since the process started)."""
    value = _status_kib("VmHWM")
    if value is not None:
        return value * 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def current_bytes() -> int:
    """The RSS now (0 where it cannot be read)."""
    value = _status_kib("VmRSS")
    return 0 if value is None else value * 1024


def _status_kib(field: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def release_freed_memory() -> bool:
    """Hand memory that Python and torch have freed back to the OS (glibc's ``malloc_trim``).

    glibc keeps freed heap pages mapped, so after the torch model is deleted the RSS stays near
    its peak and llama.cpp's validation check would come on top of it. False where there is no
    glibc.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if sys.platform != "linux" or not name:
        return False
    try:
        return bool(ctypes.CDLL(name).malloc_trim(0))
    except (OSError, AttributeError):
        return False
