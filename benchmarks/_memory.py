"""Peak-memory helpers shared by the benchmarks' worker processes (Linux ``/proc``).

tracemalloc cannot see torch or XLA buffers allocated in C++, so peaks are read from the process
status: ``VmHWM`` (high-water mark of the resident set), reset through ``/proc/self/clear_refs``.
"""

from __future__ import annotations

import resource


def status_kib(field: str) -> int | None:
    """A ``/proc/self/status`` field in KiB (``VmRSS``, ``VmHWM``), or None where unavailable."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_kib(reset_ok: bool = True) -> int:
    """The peak RSS since the last reset (VmHWM), or the process's lifetime peak (ru_maxrss)."""
    hwm = status_kib("VmHWM") if reset_ok else None
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
