"""lorafit: LoRA fine-tuning for PyTorch models.

    cfg = lorafit.LoraConfig(r=8, alpha=16, targets=["q_proj", "v_proj"])
    lorafit.inject(model, cfg)               # in place; only the adapter trains
    lorafit.save_adapter(model, "out/adapter")
    lorafit.load_adapter(model, "out/adapter")
    lorafit.merge(model); lorafit.unmerge(model)
    with lorafit.disabled(model): ...
    with lorafit.per_row(model, ["sql", None]): ...   # row i through adapter i (None: the base)
    lorafit.combine_adapters(["a", "b"], "ab", [0.7, 0.3], lorafit.CombineSpec("cat"))  # no model needed
"""

from .core import (
    AdapterFileError,
    CombineError,
    CombineSpec,
    ConfigError,
    LoraConfig,
    LoraEmbedding,
    LoraLayer,
    LoraLinear,
    LowRank,
    LowRankEmbedding,
    TargetError,
    WeightDecomposed,
    __version__,
    adapter_names,
    adapter_state,
    combine_adapters,
    delete_adapter,
    disabled,
    find_targets,
    inject,
    load_adapter,
    lora_layers,
    merge,
    merged_weight,
    per_row,
    read_adapter,
    save_adapter,
    set_adapter,
    trainable_report,
    unload,
    unmerge,
)

__all__ = [
    "__version__", "AdapterFileError", "CombineError", "CombineSpec", "ConfigError", "LoraConfig", "LoraEmbedding",
    "LoraLayer", "LoraLinear", "LowRank", "LowRankEmbedding", "TargetError", "WeightDecomposed", "adapter_names",
    "adapter_state", "combine_adapters", "delete_adapter", "disabled", "find_targets", "inject", "load_adapter",
    "lora_layers", "merge", "merged_weight", "per_row", "read_adapter", "save_adapter", "set_adapter",
    "trainable_report", "unload", "unmerge",
]  # fmt: skip
