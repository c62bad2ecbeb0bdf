"""Deterministic kill points for the fault tests: `LORAFIT_KILL_AT=point[@step][,...]` makes the process SIGKILL
itself when it reaches that point, so a test can stop a run at an exact moment (inside a checkpoint write, say)
with nothing cleaned up, as a `kill -9` or a power cut would.

The points (each names where it sits; `@step` picks the optimizer step, e.g. `checkpoint:before-rename@6`):
    step                        after an optimizer step and its metrics.jsonl row, before any checkpoint of that step
    checkpoint:after-weights    inside a checkpoint write: the temp folder holds the weights, not yet the rest
    checkpoint:before-rename    the temp folder is complete; the step-N folder is not there yet
    checkpoint:before-latest    step-N is in place; latest.json still names the checkpoint before it

In a distributed run every process reads the variable; `LORAFIT_KILL_RANK=r` limits the kill to the process of
rank r (torchrun's RANK), so a test can make one process of the run die.

Unset (always, outside the tests) it does nothing; the variables are read at every call, never cached.
"""

from __future__ import annotations

import os
import signal

ENV = "LORAFIT_KILL_AT"
RANK_ENV = "LORAFIT_KILL_RANK"
POINTS = ("step", "checkpoint:after-weights", "checkpoint:before-rename", "checkpoint:before-latest")


def kill_point(name: str, step: int | None = None) -> None:
    """SIGKILL this process when LORAFIT_KILL_AT names `name` (alone or as `name@step`); otherwise nothing."""
    wanted = os.environ.get(ENV)
    if not wanted:
        return
    if os.environ.get(RANK_ENV, os.environ.get("RANK", "0")) != os.environ.get("RANK", "0"):
        return
    here = {name} if step is None else {name, f"{name}@{step}"}
    if here & {point.strip() for point in wanted.split(",")}:
        os.kill(os.getpid(), getattr(signal, "SIGKILL", signal.SIGTERM))  # no SIGKILL on Windows
