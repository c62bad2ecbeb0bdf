"""Base models: presets that ship inside PyPI wheels (presets.py), loading any model with transformers (load.py),
and writing GGUF files llama.cpp runs: merged models (gguf_export.py, gguf_vocab.py), LoRA adapters (gguf_lora.py).
"""

from .gguf_export import FILE_TYPES, check_file_type, check_gguf_target, export_gguf
from .gguf_lora import export_lora_gguf
from .load import LOAD_ERRORS, check_merge_target, load_config, load_model, load_tokenizer, resolve, save_merged
from .presets import PRESETS, ModelError, Preset, cache_dir, cached_path, fetch, list_models, preset_of

__all__ = ["FILE_TYPES", "LOAD_ERRORS", "PRESETS", "ModelError", "Preset", "cache_dir", "cached_path",
           "check_file_type", "check_gguf_target", "check_merge_target", "export_gguf", "export_lora_gguf", "fetch",
           "list_models", "load_config", "load_model", "load_tokenizer", "preset_of", "resolve", "save_merged"]
