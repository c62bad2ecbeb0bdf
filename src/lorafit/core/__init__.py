"""The LoRA core: the maths (ΔW = BA), its config, model surgery, merging and PEFT adapter files.

It imports nothing else of lorafit. Bases stored packed (quantized) reach it through `packed.PackedWeight`, LoRA
variants through `variants.register`; it names no format, no method and no machine-specific trick.
"""

from .adapter_io import AdapterFileError, adapter_state, load_adapter, read_adapter, save_adapter
from .combine import CombineError, CombineSpec, combine_adapters
from .config import ConfigError, LoraConfig
from .dora import WeightDecomposed
from .lora import LoraEmbedding, LoraLayer, LoraLinear, LowRank, LowRankEmbedding
from .merge import merge, merged_weight, unload, unmerge
from .mixed import per_row
from .surgery import (
    TargetError,
    adapter_names,
    delete_adapter,
    disabled,
    find_targets,
    inject,
    lora_layers,
    set_adapter,
    trainable_parameters,
    trainable_report,
)

__version__ = "0.1.0"

__all__ = [
    "AdapterFileError", "CombineError", "CombineSpec", "ConfigError", "LoraConfig", "LoraEmbedding", "LoraLayer",
    "LoraLinear", "LowRank", "LowRankEmbedding", "TargetError", "WeightDecomposed", "adapter_names",
    "adapter_state", "combine_adapters", "delete_adapter", "disabled", "find_targets", "inject", "load_adapter",
    "lora_layers", "merge", "merged_weight", "per_row", "read_adapter", "save_adapter", "set_adapter",
    "trainable_parameters", "trainable_report", "unload", "unmerge",
]  # fmt: skip
