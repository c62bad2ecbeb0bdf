"""The result folder of a method that is not LoRA: what it trained, under the model's own parameter names.

`method_model.safetensors` beside `method_config.json` (the method, its options, the base model and task).
`load_method` re-adds the method's modules and loads the tensors: eval, generate and chat take such a folder as
they take a PEFT adapter folder.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from ..core import __version__
from ..core.folders import publish_tensors
from ..core.surgery import trainable_parameters
from .config import MethodConfig
from .registry import MethodError, get

METHOD_CONFIG = "method_config.json"
METHOD_WEIGHTS = "method_model.safetensors"


def save_folder(model: nn.Module, folder: str | os.PathLike, options: MethodConfig, base_model: str,
                task: str, side_files: dict[str, object] | None = None) -> dict:
    """Write the trainable parameters and the method's config to `folder`, published as a whole (with
    `side_files`, {file name: JSON value}); returns {path, file_bytes, tensor_bytes}."""
    state = {name: p.detach().cpu().contiguous() for name, p in trainable_parameters(model)}
    config = {"method": asdict(options), "base_model_name_or_path": base_model, "task": task,
              "lorafit_version": __version__}
    return publish_tensors(Path(folder), METHOD_WEIGHTS, state, {METHOD_CONFIG: config, **(side_files or {})})


def is_method_folder(folder: str | os.PathLike) -> bool:
    """True for a folder `save_folder` wrote for a non-LoRA method."""
    return (Path(folder) / METHOD_CONFIG).is_file()


def read_method_config(folder: str | os.PathLike) -> dict:
    """The JSON `save_folder` wrote, checked enough to name the file when it is not ours."""
    path = Path(folder) / METHOD_CONFIG
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise MethodError(f"{path}: cannot be read ({err})") from None
    if not isinstance(data, dict) or not isinstance(data.get("method"), dict) or "name" not in data["method"]:
        raise MethodError(f"{path}: expected {{'method': {{'name': ...}}, ...}} as `lorafit train` writes it")
    return data


def load_method(model: nn.Module, folder: str | os.PathLike) -> dict:
    """Load a non-LoRA method's result onto `model` (in place). Checks every key and shape first: a failed load
    leaves the model as it was. Returns the method config."""
    data = read_method_config(folder)
    options = MethodConfig(**data["method"])
    method = get(options.name)
    tensors = load_file(str(Path(folder) / METHOD_WEIGHTS))
    if method.add_modules is not None:
        method.add_modules(model, options)
    params = dict(model.named_parameters())
    problems = [k for k in tensors if k not in params or params[k].shape != tensors[k].shape]
    if problems:
        if method.remove_modules is not None:
            method.remove_modules(model)
        key = problems[0]
        found = f"shape {tuple(params[key].shape)}" if key in params else "no such parameter"
        raise MethodError(f"{Path(folder) / METHOD_WEIGHTS}: {key} {tuple(tensors[key].shape)} does not fit this "
                          f"model ({found}); was it trained on {data.get('base_model_name_or_path')}?")
    with torch.no_grad():
        for key, tensor in tensors.items():
            params[key].copy_(tensor)
    model.requires_grad_(False)
    return data


def check_mergeable(folder: str | os.PathLike) -> None:
    """Refuse to merge what cannot fold into the base weights: adapter layers and virtual tokens stay separate."""
    if is_method_folder(folder):
        name = read_method_config(folder)["method"]["name"]
        if not get(name).mergeable:
            raise MethodError(f"{folder}: a {name} result adds layers or inputs the base model does not have, so "
                              "it cannot be merged into a plain model (that extra cost is what LoRA avoids); "
                              "use it with eval, generate or chat")
