"""Training checkpoints: trainable weights, optimizer state, RNG state and data position, written atomically.

Layout: out/checkpoints/step-000120/{trainable.safetensors, optimizer.pt, state.json} and
out/checkpoints/latest.json naming the newest checkpoint. A checkpoint is written into a temporary folder
(`.tmp-*`, state.json last: a folder with it is complete), renamed into place, and only then does latest.json
(itself replaced atomically) point to it. Nothing is deleted before its replacement is in place: a step saved again
has its old folder moved aside first, and old checkpoints are renamed to `.tmp-*` before they are removed. So a kill
at any moment leaves at least the previous checkpoint complete; `resume_point` takes the one latest.json names, or
else the newest complete one, and `clean_temp` removes what a killed write left behind.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..core.faults import kill_point
from ..core.files import temp_dir, umask_modes, write_json
from ..core.surgery import trainable_parameters
from .distributed import World, broadcast, full_state, load_full_state

LATEST = "latest.json"
FILES = ("trainable.safetensors", "optimizer.pt", "state.json")  # state.json is written last
TEMP = ".tmp-"


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (a full disk, say); the previous checkpoint is intact and still named."""


def save_checkpoint(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict,
                    keep: int = 2, fingerprint: dict | None = None, world: World = World()) -> Path:
    """Write a checkpoint for `state['step']` and point latest.json at it; keep the newest `keep` checkpoints.

    `fingerprint` (the run's config and data, `training.fingerprint`) is stored in state.json, so that a resume
    can check it continues the same run. A failed write raises CheckpointWriteError and leaves nothing behind.
    In a distributed run every process calls this (FSDP2's shards are gathered) and rank 0 alone writes.
    """
    step = state["step"]
    final = folder / f"step-{step:06d}"
    weights, optimizer_state = full_state(model, optimizer)
    if not world.main:
        return final
    folder.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir(folder, TEMP)
    try:
        try:
            _write(tmp, weights, optimizer_state, {**state, "fingerprint": fingerprint})
        except (OSError, RuntimeError, SafetensorError) as err:  # torch.save and safetensors do not raise OSError
            raise _write_error(err, final) from err
        kill_point("checkpoint:before-rename", step)
        _move_in(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    kill_point("checkpoint:before-latest", step)
    write_json(folder / LATEST, {"checkpoint": final.name, "step": step})
    _prune(folder, step, keep)
    return final


def _write(tmp: Path, weights: dict[str, torch.Tensor], optimizer_state: dict, state: dict) -> None:
    """The checkpoint's files, into the temp folder `tmp`; state.json last (its presence marks a complete one)."""
    save_file(weights, tmp / "trainable.safetensors")
    kill_point("checkpoint:after-weights", state["step"])
    torch.save({"optimizer": optimizer_state, "torch_rng": torch.get_rng_state()}, tmp / "optimizer.pt")
    (tmp / "state.json").write_text(json.dumps(state, indent=2))
    umask_modes(tmp)  # safetensors made its file 0600


def _write_error(err: Exception, final: Path) -> CheckpointWriteError:
    """One clear OSError for a failed checkpoint write, with the errno when the library's error hides it (safetensors
    says "(os error 28)"; torch.save only "unexpected pos": a write that failed with under 1 MiB free is ENOSPC)."""
    code = err.errno if isinstance(err, OSError) else None
    found = re.search(r"os error (\d+)", str(err))
    if code is None and found:
        code = int(found.group(1))
    if code is None and shutil.disk_usage(final.parent).free < 1 << 20:
        code = errno.ENOSPC
    cause = os.strerror(code) if code else str(err)
    message = (f"{final}: could not write the checkpoint ({cause}); the previous checkpoint is intact: free some "
               "space (or fix the folder) and continue with --resume")
    return CheckpointWriteError(code, message) if code else CheckpointWriteError(message)


def _move_in(tmp: Path, final: Path) -> None:
    """Rename the complete `tmp` to `final`. An older `final` (the same step saved again: a resume from the
    checkpoint before it) is moved aside first, put back if the rename fails, and removed once the new one is in."""
    if not final.exists():
        os.replace(tmp, final)
        return
    aside = temp_dir(final.parent, TEMP)
    os.replace(final, aside / final.name)
    try:
        os.replace(tmp, final)
    except OSError:
        os.replace(aside / final.name, final)
        raise
    shutil.rmtree(aside, ignore_errors=True)


def _prune(folder: Path, step: int, keep: int) -> None:
    """Remove all but the newest `keep` checkpoints up to `step`, and any past it (left by an abandoned future:
    a run killed after writing them and resumed from an earlier one). Each is renamed away before it is removed,
    so a kill halfway through a removal never leaves a step-* folder half there."""
    saved = _steps(folder)
    doomed = [path for s, path in saved if s > step] + [path for s, path in saved if s <= step][:-keep]
    for path in doomed:
        aside = temp_dir(folder, TEMP)
        os.replace(path, aside / path.name)
        shutil.rmtree(aside, ignore_errors=True)


def _steps(folder: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every step-* folder, oldest first."""
    found = []
    for path in folder.glob("step-*"):
        try:
            found.append((int(path.name.removeprefix("step-")), path))
        except ValueError:
            continue
    return sorted(found)


def is_complete(path: Path) -> bool:
    """A checkpoint folder with every file, state.json (written last) among them."""
    return path.is_dir() and all((path / name).is_file() for name in FILES)


def resume_point(folder: Path, log: Callable[[str], None] = print) -> Path | None:
    """The checkpoint a resume continues from: the one latest.json names when it is complete, else the newest
    complete one (said in the log); None when there is none."""
    pointer = folder / LATEST
    named = None
    if pointer.is_file():
        try:
            named = folder / json.loads(pointer.read_text())["checkpoint"]
        except (ValueError, KeyError, TypeError):
            log(f"{pointer}: unreadable; looking for the newest complete checkpoint")
    if named is not None and is_complete(named):
        return named
    complete = [path for _, path in _steps(folder) if is_complete(path)]
    if not complete:
        return None
    if named is not None:
        log(f"{pointer} names {named.name}, which is missing or incomplete; "
            f"using {complete[-1].name}, the newest complete checkpoint")
    elif not pointer.is_file():
        log(f"{folder} has no {LATEST}; using {complete[-1].name}, the newest complete checkpoint")
    return complete[-1]


def clean_temp(folder: Path) -> list[Path]:
    """Remove what killed writes left in `folder`: `.tmp-*` folders and `.*.tmp` files; returns what went."""
    if not folder.is_dir():
        return []
    gone = sorted(folder.glob(f"{TEMP}*")) + sorted(folder.glob(".*.tmp"))
    for path in gone:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return gone


def read_state(path: Path) -> dict:
    """A checkpoint's state.json: step, data position, seconds and the run's fingerprint (None if not recorded)."""
    return json.loads((path / "state.json").read_text())


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, world: World = World()) -> dict:
    """Restore trainable weights, optimizer and RNG state from `path`; returns its state (step, position).

    In a distributed run rank 0 reads the files and sends them to the others (the other nodes need not see the out
    folder); the checkpoint may come from a run on any number of processes.
    """
    saved = None
    if world.main:
        extra = torch.load(path / "optimizer.pt", weights_only=True)  # tensors and numbers only: no code runs
        saved = (load_file(path / "trainable.safetensors"), extra, read_state(path))
    weights, extra, state = broadcast(saved, world)
    params = dict(trainable_parameters(model))
    if set(weights) != set(params):
        diff = sorted(set(weights) ^ set(params))[:3]
        raise ValueError(f"{path}: checkpoint does not match this run's trainable parameters (e.g. {diff}); "
                         "was the config changed since it was written?")
    load_full_state(model, optimizer, weights, extra["optimizer"])
    torch.set_rng_state(extra["torch_rng"])
    return {key: state[key] for key in ("step", "micro_batches", "seconds")}
