"""What a checkpoint must match to be continued: the run config's maths and the data files' contents.

A checkpoint records `fingerprint(cfg)`: every config key flattened (`lora.r`, `train.lr`, ...) and, for each data
file, its size and sha256. `check_resume` compares a checkpoint's record with the current run. A key in `HARMLESS`
changes how long the run is or what it logs, not what a step computes: `--force` accepts those (more
`train.steps` extend a run; the cosine schedule then follows the new total from the resumed step). Every other
difference (the model, `lora.*`, `method.*`, `data.*`, the optimiser's settings, the seed, the precision, the
data files) refuses, `--force` or not: continuing would mix two runs.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .config import RunConfig
from .runfolder import RunFolderError

HARMLESS = ("train.steps", "train.save_every", "train.log_every", "train.eval_every", "train.tensorboard",
            "train.device", "train.compile", "train.checkpointing", "train.parallel", "train.timeout",
            "eval.")  # "eval." : the whole section
PATHS = ("out", "data.train", "data.validation")  # paths: the data files are fingerprinted by their contents


def fingerprint(cfg: RunConfig) -> dict:
    """{"config": {flat key: value}, "data": {"data.train": {"bytes", "sha256"}, ...}} of the run `cfg`."""
    config = {key: value for key, value in _flat(cfg.to_dict()).items() if key not in PATHS}
    files = {f"data.{key}": getattr(cfg.data, key) for key in ("train", "validation")}
    return {"config": config, "data": {key: _file_id(Path(path)) for key, path in files.items() if path}}


def _flat(tree: dict, prefix: str = "") -> dict:
    """{"lora": {"r": 8}} -> {"lora.r": 8}, values as JSON reads them back (tuples become lists)."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = json.loads(json.dumps(value))
    return out


def _file_id(path: Path) -> dict:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return {"bytes": path.stat().st_size, "sha256": digest.hexdigest()}


def differences(saved: dict, current: dict) -> dict[str, str]:
    """{key: "old -> new"} for every config key and data file that differs between two fingerprints."""
    diff = {}
    for section in ("config", "data"):
        old, new = saved.get(section, {}), current[section]
        for key in sorted(set(old) | set(new)):
            if old.get(key) != new.get(key):
                diff[key] = _change(old.get(key), new.get(key), section == "data")
    return diff


def _change(old, new, is_file: bool) -> str:
    if is_file:
        def show(v):
            return "none" if v is None else f"{v['bytes']:,} bytes, sha256 {v['sha256'][:12]}"
        return f"contents changed ({show(old)} -> {show(new)})"
    return f"{json.dumps(old)} -> {json.dumps(new)}"


def harmless(key: str) -> bool:
    return any(key == h or (h.endswith(".") and key.startswith(h)) for h in HARMLESS)


def check_resume(saved: dict | None, current: dict, force: bool, checkpoint: Path) -> dict[str, str]:
    """Raise RunFolderError unless the checkpoint's fingerprint `saved` matches `current` (with `force`: up to
    harmless keys); returns the differences accepted, for the log."""
    if saved is None:
        if force:
            return {"(unrecorded)": "the checkpoint has no fingerprint; continuing as --force asks"}
        raise RunFolderError(f"--resume: {checkpoint} records no run fingerprint (written by an older lorafit), so it "
                             "cannot be checked against this config; pass --force to continue it anyway")
    diff = differences(saved, current)
    maths = {k: v for k, v in diff.items() if not harmless(k)}
    if maths:
        listed = "; ".join(f"{k}: {v}" for k, v in maths.items())
        raise RunFolderError(f"--resume: {checkpoint} was written by a different run ({listed}). These change what "
                             "is trained, so --force does not apply: restore them, or start a new run "
                             "(--overwrite, or another --out)")
    if diff and not force:
        listed = "; ".join(f"{k}: {v}" for k, v in diff.items())
        raise RunFolderError(f"--resume: the config differs from {checkpoint}'s ({listed}); these do not change "
                             "what a step computes: pass --force to continue with them")
    return diff
