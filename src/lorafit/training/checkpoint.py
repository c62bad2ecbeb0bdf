"""Training checkpoints: trainable weights, optimizer state, RNG state and data position, written atomically.

Layout: out/checkpoints/step-000120/{trainable.safetensors, optimizer.pt, state.json} and
out/checkpoints/latest.json naming the newest complete one. A new checkpoint is written into a temporary folder,
renamed into place, and only then does latest.json (itself replaced atomically) point to it: a kill at any moment
leaves the previous checkpoint intact and named.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..core.files import os_errors_named, write_json
from ..core.surgery import trainable_parameters

LATEST = "latest.json"


def save_checkpoint(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict,
                    keep: int = 2) -> Path:
    """Write a checkpoint for `state['step']` and point latest.json at it; keep the newest `keep` checkpoints."""
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"step-{state['step']:06d}"
    tmp = Path(tempfile.mkdtemp(dir=folder, prefix=".tmp-"))
    try:
        weights = {name: p.detach().cpu().contiguous() for name, p in trainable_parameters(model)}
        with os_errors_named(final):  # a full disk as an OSError naming the folder, not a writer's own error
            save_file(weights, tmp / "trainable.safetensors")
            torch.save({"optimizer": optimizer.state_dict(), "torch_rng": torch.get_rng_state()}, tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps(state, indent=2))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    write_json(folder / LATEST, {"checkpoint": final.name, "step": state["step"]})
    for old in sorted(folder.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(folder: Path) -> Path | None:
    """The newest complete checkpoint, or None when there is none."""
    pointer = folder / LATEST
    if not pointer.is_file():
        return None
    path = folder / json.loads(pointer.read_text())["checkpoint"]
    return path if path.is_dir() else None


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Restore trainable weights, optimizer and RNG state from `path`; returns its state dict (step, position)."""
    weights = load_file(path / "trainable.safetensors")
    params = dict(trainable_parameters(model))
    if set(weights) != set(params):
        diff = sorted(set(weights) ^ set(params))[:3]
        raise ValueError(f"{path}: checkpoint does not match this run's trainable parameters (e.g. {diff}); "
                         "was the config changed since it was written?")
    with torch.no_grad():
        for name, tensor in weights.items():
            params[name].copy_(tensor)
    extra = torch.load(path / "optimizer.pt", weights_only=True)  # tensors and numbers only: no code runs
    optimizer.load_state_dict(extra["optimizer"])
    torch.set_rng_state(extra["torch_rng"])
    return json.loads((path / "state.json").read_text())
