"""Fine-tuning methods beside LoRA, on the same data path, loop and reports (`method:` in the run config).

    lora        low-rank ΔW = BA on chosen Linear layers (lorafit's core; PEFT adapter files)
    full        every parameter trains
    freeze      only the top K blocks (plus final norm and a classifier's head): "partial freezing"
    bitfit      only the biases (Ben Zaken et al. 2022)
    adapter     Houlsby bottleneck adapters after attention and MLP (Houlsby et al. 2019)
    prefix      trainable keys/values prepended at every layer (Li & Liang 2021)
    prompt      trainable input embeddings prepended to the sequence (Lester et al. 2021)
    mezo        forward-only zeroth-order optimiser over LoRA or all parameters (Malladi et al. 2023)
    in-context  no training: k solved examples in each prompt

Files: LoRA (and MeZO over LoRA) save PEFT's adapter folder. Every other method saves what it trained, under the
model's own parameter names, in `method_model.safetensors`, beside `method_config.json` (the method, its options,
the base model and task). `load_method` re-adds the method's modules and loads the tensors: eval, generate and
chat take either folder.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..config import LoraConfig
from ..files import atomic_write, write_json
from ..optim import trainable_parameters
from .select import MethodError, head_of, train_all, train_biases, train_head, train_top_blocks

METHOD_CONFIG = "method_config.json"
METHOD_WEIGHTS = "method_model.safetensors"

__all__ = ["METHOD_CONFIG", "METHOD_WEIGHTS", "MethodError", "check_mergeable", "head_of", "is_method_folder",
           "load_method",
           "save_method", "setup", "uses_lora"]


def uses_lora(method) -> bool:
    """True when the method trains LoRA adapters (and so saves PEFT files): lora, and mezo over LoRA."""
    return method.name == "lora" or (method.name == "mezo" and method.mezo_params == "lora")


def setup(model: nn.Module, method, lora_cfg: LoraConfig) -> None:
    """Freeze the base and make trainable what `method` (a MethodConfig) trains, adding its modules if any."""
    import lorafit

    name = method.name
    if uses_lora(method):
        lorafit.inject(model, lora_cfg)
    elif name in ("full", "mezo"):
        train_all(model)
    elif name == "freeze":
        train_top_blocks(model, method.top_blocks)
    elif name == "bitfit":
        train_biases(model)
    else:  # adapter, prefix, prompt: new modules train; in-context: nothing trains
        model.requires_grad_(False)
        _add_modules(model, method)
        if name != "in-context":
            train_head(model)


def _add_modules(model: nn.Module, method) -> None:
    """The modules that adapter / prefix / prompt add (trainable); nothing for the other methods."""
    if method.name == "adapter":
        from .houlsby import add_houlsby

        add_houlsby(model, bottleneck=method.bottleneck)
    elif method.name in ("prefix", "prompt"):
        from .virtual import add_virtual_tokens

        add_virtual_tokens(model, method.name, n=method.virtual_tokens)
    for param_name, param in model.named_parameters():
        if ".houlsby." in f".{param_name}" or param_name.startswith("lorafit_virtual."):
            param.requires_grad_(True)


def save_method(model: nn.Module, folder: str | os.PathLike, method, base_model: str, task: str) -> dict:
    """Write what the method trained to `folder`; LoRA methods write PEFT's adapter folder instead."""
    import lorafit

    if uses_lora(method):
        return lorafit.save_adapter(model, folder)
    state = {name: p.detach().cpu().contiguous() for name, p in trainable_parameters(model)}
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights = folder / METHOD_WEIGHTS
    atomic_write(weights, lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
    write_json(folder / METHOD_CONFIG, {"method": asdict(method), "base_model_name_or_path": base_model,
                                        "task": task, "lorafit_version": lorafit.__version__})
    tensor_bytes = sum(t.numel() * t.element_size() for t in state.values())
    return {"path": str(folder), "file_bytes": weights.stat().st_size, "tensor_bytes": tensor_bytes}


def is_method_folder(folder: str | os.PathLike) -> bool:
    """True for a folder `save_method` wrote for a non-LoRA method."""
    return (Path(folder) / METHOD_CONFIG).is_file()


def check_mergeable(folder: str | os.PathLike) -> None:
    """Refuse to merge what cannot fold into the base weights: adapter layers and virtual tokens stay separate."""
    if is_method_folder(folder):
        name = read_method_config(folder)["method"]["name"]
        if name in ("adapter", "prefix", "prompt"):
            raise MethodError(f"{folder}: a {name} result adds layers or inputs the base model does not have, so "
                              "it cannot be merged into a plain model (that extra cost is what LoRA avoids); "
                              "use it with eval, generate or chat")


def read_method_config(folder: str | os.PathLike) -> dict:
    """The JSON `save_method` wrote, checked enough to name the file when it is not ours."""
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
    from ..runconfig import MethodConfig

    data = read_method_config(folder)
    method = MethodConfig(**data["method"])
    tensors = load_file(str(Path(folder) / METHOD_WEIGHTS))
    _add_modules(model, method)
    params = dict(model.named_parameters())
    problems = [k for k in tensors if k not in params or params[k].shape != tensors[k].shape]
    if problems:
        _remove_modules(model, method)
        key = problems[0]
        found = f"shape {tuple(params[key].shape)}" if key in params else "no such parameter"
        raise MethodError(f"{Path(folder) / METHOD_WEIGHTS}: {key} {tuple(tensors[key].shape)} does not fit this "
                          f"model ({found}); was it trained on {data.get('base_model_name_or_path')}?")
    with torch.no_grad():
        for key, tensor in tensors.items():
            params[key].copy_(tensor)
    model.requires_grad_(False)
    return data


def _remove_modules(model: nn.Module, method) -> None:
    if method.name == "adapter":
        from .houlsby import remove_houlsby

        remove_houlsby(model)
    elif method.name in ("prefix", "prompt"):
        from .virtual import remove_virtual_tokens

        remove_virtual_tokens(model)
