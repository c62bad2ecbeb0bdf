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

Each is a `Method` (registry.py) registered by its own file. LoRA (and MeZO over LoRA) save PEFT's adapter folder;
every other method saves what it trained in a folder of its own (folder.py).
"""

from __future__ import annotations

import os

from torch import nn

from ..core.adapter_io import save_adapter
from ..core.anatomy import head_of
from ..core.config import LoraConfig
from ..data import to_device

# Each file registers its methods; the order here is the order users see them in.
# isort: off
from . import lora, select, houlsby, virtual, mezo, incontext  # noqa: F401
# isort: on
from .config import MethodConfig
from .folder import METHOD_CONFIG, METHOD_WEIGHTS, check_mergeable, is_method_folder, load_method, save_folder
from .registry import METHODS, Method, MethodError, get, names, register
from .virtual import virtual_inputs

__all__ = ["METHODS", "METHOD_CONFIG", "METHOD_WEIGHTS", "Method", "MethodConfig", "MethodError",
           "check_mergeable", "get", "head_of", "is_method_folder", "load_method", "model_inputs", "names",
           "register", "save_method", "setup", "uses_lora"]


def uses_lora(options: MethodConfig) -> bool:
    """True when the method trains LoRA adapters (and so saves PEFT files): lora, and mezo over LoRA."""
    return get(options.name).uses_lora(options)


def setup(model: nn.Module, options: MethodConfig, lora_cfg: LoraConfig) -> None:
    """Freeze the base and make trainable what the method trains, adding its modules if any."""
    get(options.name).setup(model, options, lora_cfg)


def save_method(model: nn.Module, folder: str | os.PathLike, options: MethodConfig, base_model: str,
                task: str, side_files: dict[str, object] | None = None) -> dict:
    """Write what the method trained to `folder`, as a whole; LoRA methods write PEFT's adapter folder.

    `side_files` ({file name: JSON value}) go into the same folder, published with it.
    """
    if uses_lora(options):
        return save_adapter(model, folder, side_files=side_files)
    return save_folder(model, folder, options, base_model, task, side_files)


def model_inputs(model: nn.Module, batch: dict) -> tuple[dict, int]:
    """`batch` as the model takes it: on the model's device, with the method's virtual tokens put in (if any).

    Returns (model kwargs, leading output positions that are virtual); see `virtual.virtual_inputs`.
    """
    return virtual_inputs(model, to_device(batch, next(model.parameters()).device))
