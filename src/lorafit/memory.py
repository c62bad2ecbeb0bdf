"""Peak memory of one phase of a run (inference, training), not of the whole process.

Linux keeps a process's peak resident set (VmHWM in /proc/self/status) and lets the process reset it by writing
5 to /proc/self/clear_refs. Where that is not possible the lifetime peak (getrusage) is reported instead, and
the result says so.
"""

from __future__ import annotations

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
