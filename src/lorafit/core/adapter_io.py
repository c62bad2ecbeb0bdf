"""Adapter files in Hugging Face PEFT's layout, both ways.

A folder with `adapter_config.json` and `adapter_model.safetensors`; tensor keys are
`base_model.model.<module path>.lora_A.weight` (r, in) and `.lora_B.weight` (out, r), or
`.lora_embedding_A` (r, vocab) / `.lora_embedding_B` (dim, r) for embeddings; biases and modules_to_save are
stored under their own parameter paths. Loading reads JSON and safetensors only (no pickle), checks every key
and shape against the model first, and changes nothing when a check fails.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as safetensors_load
from torch import nn

from .config import ConfigError, LoraConfig
from .folders import publish_tensors, read_folder
from .init import changed_base, converted
from .lora import LoraEmbedding, LoraLayer, LowRankEmbedding
from .surgery import TargetError, find_targets, inject, lora_layers, module_kind, modules_to_save, name_matches
from .variants import variant

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
LABELS_FILE = "labels.json"  # lorafit's own: a classifier head's class names, in order (PEFT ignores it)
LORAFIT_FILE = "lorafit.json"  # lorafit's own record of the run, e.g. {"base_preset": ...} (PEFT ignores it)
PREFIX = "base_model.model."
LORA_SUFFIXES = (".lora_A.weight", ".lora_B.weight", ".lora_embedding_A", ".lora_embedding_B",
                 ".lora_magnitude_vector")  # the last: DoRA's magnitudes


class AdapterFileError(ValueError):
    """An adapter folder that cannot be read onto this model; the message names the file and the key."""


def adapter_state(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """The tensors of adapter `name` under PEFT's keys (what `save_adapter` writes)."""
    cfg: LoraConfig = model.lora_configs[name]
    state = {}
    for path, layer in lora_layers(model):
        if name not in layer.lora:
            continue
        state.update({path + suffix: t for suffix, t in layer.lora[name].peft_tensors().items()})
    wrapped = {path: name in layer.lora for path, layer in lora_layers(model)}  # LoRA layer -> has this adapter
    for key, param in model.named_parameters():
        owner = key.removesuffix(".bias")
        if owner == key or ".lora." in key:
            continue
        if cfg.bias == "all" or (cfg.bias == "lora_only" and wrapped.get(owner, False)):
            state[f"{owner}.base_layer.bias" if owner in wrapped else key] = param  # PEFT's key for wrapped layers
    for path, module in model.named_modules():
        if path and name_matches(path, cfg.modules_to_save):  # trained in full: every parameter is saved
            state.update({f"{path}.{k}": v for k, v in module.named_parameters()})
    return {PREFIX + k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}


def save_adapter(model: nn.Module, path: str | os.PathLike, name: str | None = None,
                 side_files: dict[str, object] | None = None, convert_init: bool = True) -> dict:
    """Write adapter `name` (default: the active one) to folder `path` in PEFT's format, the folder as a whole.

    The folder is built beside `path` and swapped in at once (`files.publish_folder`): a reader sees the previous
    adapter or this one, never one's weights with the other's config. It holds the two PEFT files plus
    `side_files` ({file name: JSON value}, e.g. a classifier's labels.json), which PEFT ignores. Returns
    {"path", "file_bytes", "tensor_bytes"}: the safetensors file is the tensors' bytes plus a small JSON header.

    An adapter initialised from the base weights (init pissa / olora) changed them to a residual; with
    `convert_init` (the default) it is written as a plain LoRA adapter of rank 2r for the original base, which any
    PEFT user can load (lorafit.core.init.converted). convert_init=False writes PEFT's unconverted form instead.
    """
    name = name or getattr(model, "lora_active", None)
    if name is None or name not in getattr(model, "lora_configs", {}):
        raise ValueError(f"no adapter {name!r} to save; the model has: {list(getattr(model, 'lora_configs', {}))}")
    cfg: LoraConfig = model.lora_configs[name]
    state = adapter_state(model, name)
    layers = [(p, layer) for p, layer in lora_layers(model) if name in layer.lora]
    peft = cfg.to_peft(fan_in_fan_out=any(getattr(layer, "fan_in_fan_out", False) for _, layer in layers))
    if not peft["base_model_name_or_path"]:  # as PEFT does: the folder or hub id the model was loaded from
        peft["base_model_name_or_path"] = getattr(model, "name_or_path", None) or None
    if cfg.targets == "all-linear":  # written out, as PEFT does, so any reader selects the same modules
        peft["target_modules"] = sorted(p for p, _ in layers)
    initial = {PREFIX + p: layer.lora[name].initial_factors for p, layer in layers if changed_base(layer, name)}
    if convert_init and initial:
        state, peft = converted(state, initial, peft)
    return publish_tensors(Path(path), WEIGHTS_FILE, state, {CONFIG_FILE: peft, **(side_files or {})})


def read_adapter(path: str | os.PathLike) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """Config and tensors of an adapter folder (keys without the `base_model.model.` prefix). No pickle.

    Both files come from one version of the folder, even while another process saves over it.
    """
    folder = Path(path)
    config_file, weights_file = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    if not folder.is_dir():
        what = "not a folder" if folder.exists() else "not found"
        raise AdapterFileError(f"{folder}: {what} (an adapter folder holds {CONFIG_FILE} and {WEIGHTS_FILE})")
    try:
        raw = read_folder(folder, (CONFIG_FILE, WEIGHTS_FILE))
    except FileNotFoundError as err:
        found = ", ".join(sorted(p.name for p in folder.iterdir())) or "nothing"
        missing = folder / err.filename if err.filename else folder
        hint = "lorafit reads safetensors only; " if missing.name == WEIGHTS_FILE else ""
        raise AdapterFileError(f"{missing}: not found ({hint}the folder holds: {found})") from None
    try:
        data = json.loads(raw[CONFIG_FILE].decode())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AdapterFileError(f"{config_file}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise AdapterFileError(f"{config_file}: expected a JSON object, got {type(data).__name__}")
    try:
        cfg = LoraConfig.from_peft(data, source=str(config_file))
    except ConfigError as err:
        raise AdapterFileError(str(err)) from None
    try:
        tensors = {key.removeprefix(PREFIX): t for key, t in safetensors_load(raw[WEIGHTS_FILE]).items()}
    except (SafetensorError, OSError, RuntimeError, ValueError) as err:
        raise AdapterFileError(f"{weights_file}: cannot be read as safetensors ({err}); the file is corrupt "
                               "or truncated") from None
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise AdapterFileError(f"{weights_file}: tensor {PREFIX + key} holds NaN or infinite values")
    return cfg, tensors


def _expected_shapes(module: nn.Module, r: int, kind: str) -> dict[str, tuple[int, ...]]:
    """The adapter tensor shapes a target module needs for an update of variant `kind`, keyed by PEFT's suffix
    (read off an update built on the meta device: no memory, and each variant says what its files hold)."""
    with torch.device("meta"):
        if isinstance(module, LoraEmbedding) or module_kind(module) == "embedding":
            vocab, dim = module.weight.shape
            update = LowRankEmbedding(vocab, dim, r, 1.0, "kaiming")
        else:
            if isinstance(module, LoraLayer):
                fan_in, fan_out = module.in_features, module.out_features
            elif module_kind(module) == "conv1d":
                fan_in, fan_out = module.weight.shape
            else:
                fan_out, fan_in = module.weight.shape
            update = variant(kind)(fan_in, fan_out, r, 1.0, 0.0, "kaiming")
    return {suffix: tuple(t.shape) for suffix, t in update.peft_tensors().items()}


def _check_fits(model: nn.Module, cfg: LoraConfig, tensors: dict, source: Path) -> list[str]:
    """Raise AdapterFileError at the first key that is missing, unexpected or misshapen; return the targets."""
    try:
        targets = find_targets(model, cfg)
        modules_to_save(model, cfg.modules_to_save)
    except TargetError as err:
        raise AdapterFileError(f"{source / CONFIG_FILE}: {err}") from None
    expected = {}
    for target in targets:
        for suffix, shape in _expected_shapes(model.get_submodule(target), cfg.rank_of(target), cfg.variant).items():
            expected[target + suffix] = shape
    for key, shape in expected.items():
        if key not in tensors:
            raise AdapterFileError(f"{source / WEIGHTS_FILE}: missing tensor {PREFIX + key} for target {key}")
        if tuple(tensors[key].shape) != shape:
            raise AdapterFileError(f"{source / WEIGHTS_FILE}: tensor {PREFIX + key} has shape "
                                   f"{tuple(tensors[key].shape)}, the model needs {shape} (adapter for another model?)")
    params = {k: v for k, v in model.named_parameters() if ".lora." not in k}
    for key, tensor in tensors.items():
        if key in expected:
            continue
        base_key = key.replace(".base_layer.", ".")
        if key.endswith(LORA_SUFFIXES):
            raise AdapterFileError(f"{source / WEIGHTS_FILE}: tensor {PREFIX + key} belongs to no module that "
                                   f"target_modules={cfg.targets!r} selects")
        if base_key not in params:
            raise AdapterFileError(f"{source / WEIGHTS_FILE}: tensor {PREFIX + key} matches no parameter of the model")
        if params[base_key].shape != tensor.shape:
            raise AdapterFileError(f"{source / WEIGHTS_FILE}: tensor {PREFIX + key} has shape {tuple(tensor.shape)}, "
                                   f"the model's {base_key} is {tuple(params[base_key].shape)}")
    return targets


@torch.no_grad()
def load_adapter(model: nn.Module, path: str | os.PathLike, name: str = "default") -> nn.Module:
    """Load a PEFT-format adapter folder onto `model` as adapter `name` and make it the active one.

    Works on a plain model (LoRA layers are injected as the file's config says) and on one that already carries
    adapters. Every key and shape is checked before the model is touched: on error the model is unchanged.
    """
    if name in getattr(model, "lora_configs", {}):
        raise ValueError(f"the model already has an adapter named {name!r}; pass another name")
    source = Path(path)
    cfg, tensors = read_adapter(source)
    _check_fits(model, cfg, tensors, source)
    inject(model, cfg, name)
    for path_, layer in lora_layers(model):
        if name not in layer.lora:
            continue
        for suffix, param in layer.lora[name].peft_tensors().items():
            param.copy_(tensors[path_ + suffix])
    params = dict(model.named_parameters())
    for key, tensor in tensors.items():
        if not key.endswith(LORA_SUFFIXES):
            params[key.replace(".base_layer.", ".")].copy_(tensor)  # biases, modules_to_save, saved embeddings
    return model
