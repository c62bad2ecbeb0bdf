"""Peak memory of one phase of a run (inference, training), not of the whole process.

Linux keeps a process's peak resident set (VmHWM in /proc/self/status) and lets the process reset it by writing
5 to /proc/self/clear_refs. Where that is not possible the lifetime peak (getrusage) is reported instead, and
the result says so.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import resource
from pathlib import Path

import torch


def reset_peak() -> bool:
    """Start a new peak-RSS window; False when the OS does not allow it (the lifetime peak will be reported)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """Peak resident memory in MB since the last successful `reset_peak` (else since the process started)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kB


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers (malloc.h)
KEEP_BELOW = 256 << 20  # blocks under this come from the reusable heap, not from fresh pages
TRIM_ABOVE = 1 << 30  # free memory at the heap's top goes back to the OS only past this much


_kept = False  # whether keep_freed_memory changed this process's allocator (set once, by an entry point)


def keep_freed_memory() -> bool:
    """Have glibc keep memory a training step frees for the next step instead of returning it to the OS.

    By default glibc serves blocks over a threshold (adapting, up to 32 MB) with fresh pages and trims the heap
    when its top is free, so every step's activations and loss buffers page-fault anew; with this, steps reuse
    what the last one freed (faster steps, docs/performance.md has the figures). Process-wide and lasting, so
    only the entry point of a run calls it (`lorafit train`, a benchmark's worker), never a library function.
    False (nothing done) where the C library is not glibc.
    """
    global _kept
    libc = c_library()
    if libc is None or not hasattr(libc, "mallopt") or not hasattr(libc, "gnu_get_libc_version"):
        return False
    _kept = bool(libc.mallopt(_M_MMAP_THRESHOLD, KEEP_BELOW)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, TRIM_ABOVE))
    return _kept


def allocator() -> str:
    """How this process's C library treats freed memory, for a run's report."""
    return "glibc, freed memory kept for reuse" if _kept else "the C library's default"


def c_library() -> ctypes.CDLL | None:
    """The process's C library (for glibc's malloc controls), or None where it cannot be found."""
    name = ctypes.util.find_library("c")
    return ctypes.CDLL(name) if name else None


class PeakWindow:
    """`with PeakWindow() as peak: ...` then `peak.mb`: the peak RSS inside the block (or lifetime, see .scoped),
    and `peak.gpu_mb`: the peak of memory allocated on the current CUDA device (None without CUDA)."""

    def __enter__(self):
        self.scoped = reset_peak()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        return self

    def __exit__(self, *exc):
        self.mb = round(peak_rss_mb(), 1)
        self.gpu_mb = round(torch.cuda.max_memory_allocated() / 2**20, 1) if torch.cuda.is_available() else None
