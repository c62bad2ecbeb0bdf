"""Allocator settings, seen through the page faults of a fresh process.

keep_freed_memory() changes the allocator of the whole process for good, so it only ever runs in the subprocesses
this test starts, never in pytest's own process (nor in the skip decision, which only looks for glibc).
"""

import subprocess
import sys

import pytest

from lorafit.training.cpu import memory

FAULTS = """
import sys, torch
from lorafit.training.cpu.memory import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
def faults():
    return int(open("/proc/self/stat").read().split()[9])  # minor page faults so far
for _ in range(10):  # warm-up "steps", each filling and freeing a 40 MB buffer, before counting
    torch.empty(10 << 20).fill_(1.0)
start = faults()
for _ in range(30):
    torch.empty(10 << 20).fill_(1.0)
print(faults() - start)
"""


def faults(mode: str) -> int:
    done = subprocess.run([sys.executable, "-c", FAULTS, mode], capture_output=True, text=True, check=True)
    return int(done.stdout.split()[-1])


def glibc() -> bool:
    """Whether keep_freed_memory can work here (a glibc with mallopt), asked without calling mallopt."""
    libc = memory.c_library()
    return libc is not None and hasattr(libc, "mallopt") and hasattr(libc, "gnu_get_libc_version")


@pytest.mark.skipif(not glibc(), reason="needs glibc")
def test_kept_memory_is_reused_without_page_faults():
    default, kept = faults("default"), faults("keep")
    assert default > 30 * 10_240 * 0.5  # 40 MB is 10,240 pages: glibc maps fresh ones for every buffer
    assert kept < default / 10  # once warm, the kept heap serves every step without fresh pages
    assert memory.allocator() == "the C library's default"  # only the subprocess changed its allocator
