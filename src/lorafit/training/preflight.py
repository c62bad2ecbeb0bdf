"""Checks a run can pass before it loads a single weight: the out folder can be written, the model exists, and
`lora.targets` name modules the model has.

A typo in `lora.targets` would otherwise surface after the base model has been loaded and scored, minutes into
the run. The architecture is built from its config on PyTorch's meta device (shapes, no storage: it costs
nothing), and surgery's own `find_targets` runs on it. The config comes from the model folder's config.json, or a
GGUF file's metadata header; a preset that is not fetched yet or a hub id is skipped (loading reports those).
"""

from __future__ import annotations

import difflib
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from ..core.config import ConfigError, LoraConfig
from ..core.files import check_writable
from ..core.surgery import TargetError, find_targets
from ..methods import uses_lora
from ..models import LOAD_ERRORS, PRESETS, cached_path, resolve
from .config import RunConfig


def preflight(cfg: RunConfig) -> None:
    """Raise now what would fail later: an out folder that cannot be written (OSError), a model path that is no
    model (ModelError), targets the model lacks (ConfigError naming lora.targets). Creates nothing."""
    check_writable(cfg.out)
    if cfg.model.name not in PRESETS:  # a preset may need fetching: loading does that (and reports its errors)
        resolve(cfg.model.name)  # ModelError for a path that does not exist or is no model
    if not uses_lora(cfg.method) or (cfg.lora.targets == "all-linear" and cfg.lora.layers is None):
        return  # nothing to check: all-linear finds the linear layers of any transformer
    model = meta_model(cfg.model.name, cfg.model.task)
    if model is not None:
        check_targets(model, cfg.lora)


def check_targets(model: nn.Module, lora: LoraConfig) -> None:
    """ConfigError naming lora.targets unless every entry of a list (or the regex) selects a module of `model`.

    Surgery only needs one match; here a typo in one name of several ([q_prj, v_proj]) is an error too, since it
    would silently train fewer modules than the config says.
    """
    try:
        find_targets(model, lora)
    except TargetError as err:
        raise ConfigError(f"lora.targets: {str(err).removeprefix('targets ')}") from None
    for name in lora.targets if isinstance(lora.targets, list) else []:
        try:
            find_targets(model, replace(lora, targets=[name]))
        except TargetError as err:
            wrappable = str(err).rpartition("modules LoRA can wrap: ")[2].split(", ")
            close = difflib.get_close_matches(name, wrappable, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ConfigError(f"lora.targets: {name!r} matches no module of {type(model).__name__}"
                              f"{f' in layers {lora.layers}' if lora.layers is not None else ''}; {hint}(modules "
                              f"LoRA can wrap: {', '.join(wrappable)})") from None


def meta_model(name: str, task: str = "causal-lm") -> nn.Module | None:
    """The architecture of model `name` on the meta device, or None when its config cannot be read locally."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification  # heavy: seconds to import

    config = local_config(name)
    if config is None:
        return None
    auto = AutoModelForSequenceClassification if task == "classification" else AutoModelForCausalLM
    try:
        with torch.device("meta"):
            return auto.from_config(config)
    except (ValueError, KeyError, TypeError, RuntimeError, NotImplementedError):
        return None  # an architecture transformers cannot build this way: loading will say what is wrong


def local_config(name: str):
    """The transformers config of a preset already fetched, a model folder or a .gguf file; None otherwise (a
    preset not yet fetched, a hub id, an unreadable config: the normal load reports those)."""
    from transformers import AutoConfig  # heavy: seconds to import

    path = cached_path(name) if name in PRESETS else Path(name).expanduser()
    if path is None or not path.exists():
        return None
    if path.is_file() and path.suffix.lower() == ".gguf":
        where, kwargs = path.parent, {"gguf_file": path.name}
    elif path.is_dir() and (path / "config.json").is_file():
        where, kwargs = path, {}
    else:
        return None
    try:
        return AutoConfig.from_pretrained(str(where), **kwargs)
    except (*LOAD_ERRORS, TypeError):  # an unreadable config: skip the check, loading reports it properly
        return None
