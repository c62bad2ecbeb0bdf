"""One run per out folder, and no run silently replacing another.

`run_lock(out)` holds an OS file lock (flock on out/.lock, with the holder's PID written in it) for the whole
run: a second run on the same folder stops at once with the PID of the first. The OS drops the lock when the
process ends, however it ends, so a killed run never blocks the next one.

`claim(out, resume, overwrite)` then decides what happens to an earlier run's outputs: a run without `--resume`
refuses to start over them unless `--overwrite` clears them first; every run removes temp files that killed
writes left behind.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .checkpoint import clean_temp

try:
    import fcntl
except ImportError:  # Windows: no flock; runs are not locked there
    fcntl = None

LOCK = ".lock"
OUTPUTS = ("checkpoints", "adapter", "results.json", "metrics.jsonl")  # any of these: the folder holds a run
DERIVED = ("loss.png", "before_after.png", "tensorboard")  # also cleared by --overwrite


class RunFolderError(ValueError):
    """The out folder's state does not allow this run (locked, holds an earlier run, or a different one)."""


@contextmanager
def run_lock(out: Path) -> Iterator[None]:
    """Hold out/.lock (exclusive flock, our PID inside) while the block runs; RunFolderError if another holds it."""
    out.mkdir(parents=True, exist_ok=True)
    fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
                raise RunFolderError(f"{out}: another run (pid {holder}) is using this out folder; wait for it to "
                                     "finish, or pass another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)  # the file stays (removing a lock file races with the next run taking it)
    finally:
        os.close(fd)  # releases the lock


def earlier_run(out: Path) -> list[str]:
    """The outputs of an earlier run found in `out` (checkpoints, adapter, results.json, metrics.jsonl); an empty
    folder among them does not count."""
    return [name for name in OUTPUTS if (out / name).is_file() or (out / name).is_dir() and any((out / name).iterdir())]


def claim(out: Path, resume: bool, overwrite: bool, log: Callable[[str], None]) -> None:
    """Make `out` ready for this run (the lock held): refuse to start over an earlier run unless `overwrite`,
    which clears it; remove temp files of killed writes."""
    if resume and overwrite:
        raise RunFolderError("--resume continues the run in the out folder, --overwrite clears it: pass one of them")
    found = earlier_run(out)
    if found and overwrite:
        for name in (*OUTPUTS, *DERIVED):
            path = out / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
        log(f"--overwrite: cleared the earlier run in {out} ({', '.join(found)})")
    elif found and not resume:
        raise RunFolderError(f"{out} holds an earlier run ({', '.join(found)}); pass --resume to continue it, "
                             "--overwrite to replace it, or another --out")
    gone = [p for folder in (out, out / "checkpoints", out / "adapter") for p in clean_temp(folder)]
    if gone:
        log(f"removed {len(gone)} temp file(s) left by an interrupted write: {', '.join(p.name for p in gone)}")
