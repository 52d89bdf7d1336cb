"""Peak resident memory of this process, resettable (Linux ``/proc``), for benchmark figures."""

from __future__ import annotations

import ctypes
import resource
import time


def reset_peak() -> None:
    """Reset the peak resident set size (VmHWM) to the current size, where the kernel allows it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def start_measuring() -> float:
    """Give memory freed so far (a warm-up's) back to the system, reset the peak, return the current
    size: without the trim, a measured call could reuse freed heap and its peak depend on what ran
    before it."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    start = current_mib()
    reset_peak()
    return start


def peak_mib() -> float:
    """Peak resident set size since the last reset, in MiB."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_mib() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def timed(fn):
    """``(fn(), seconds, peak MiB above the start)``, measured from a trimmed start
    (:func:`start_measuring`): a stage could reuse the heap an earlier stage freed, and its peak
    came out low (gradient flow end to end, mean only: 546 MiB recorded, 787 trimmed)."""
    base = start_measuring()
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0, peak_mib() - base
