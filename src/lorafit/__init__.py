"""lorafit: LoRA fine-tuning for PyTorch models.

    cfg = lorafit.LoraConfig(r=8, alpha=16, targets=["q_proj", "v_proj"])
    lorafit.inject(model, cfg)               # in place; only the adapter trains
    lorafit.save_adapter(model, "out/adapter")
    lorafit.load_adapter(model, "out/adapter")
    lorafit.merge(model); lorafit.unmerge(model)
    with lorafit.disabled(model): ...
"""

from .adapter_io import AdapterFileError, adapter_state, load_adapter, read_adapter, save_adapter
from .config import ConfigError, LoraConfig
from .lora import LoraEmbedding, LoraLayer, LoraLinear, LowRank, LowRankEmbedding
from .merge import merge, merged_weight, unload, unmerge
from .surgery import (
    TargetError,
    adapter_names,
    delete_adapter,
    disabled,
    find_targets,
    inject,
    lora_layers,
    set_adapter,
    trainable_report,
)

__version__ = "0.1.0"

__all__ = [
    "AdapterFileError", "ConfigError", "LoraConfig", "LoraEmbedding", "LoraLayer", "LoraLinear", "LowRank",
    "LowRankEmbedding", "TargetError", "adapter_names", "adapter_state", "delete_adapter", "disabled",
    "find_targets", "inject", "load_adapter", "lora_layers", "merge", "merged_weight", "read_adapter",
    "save_adapter", "set_adapter", "trainable_report", "unload", "unmerge",
]  # fmt: skip
