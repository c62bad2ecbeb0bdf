"""PEFT's adapter_config.json, checked field by field before lorafit reads it.

Every key lorafit reads has a type and a range, and the default PEFT's LoraConfig gives it when the key is missing
(or null). A value of the wrong type is an error naming the file and the key, never a silent reading: a string
"yes" for `use_rslora` is not true, and a missing `lora_alpha` is PEFT's 8.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable

MAX_ALPHA = 1e6  # a larger alpha overflows ΔW = alpha / r · BA in bf16 and fp16 and, far enough, in fp32
BIASES = ("none", "lora_only", "all")
# PEFT's named initialisations (init_lora_weights); which of them lorafit can load is decided in config.py
PEFT_INITS = ("gaussian", "pissa", "olora", "eva", "orthogonal", "mica", "corda", "loftq", "lora_ga")

# PEFT's defaults for the keys lorafit reads (peft.LoraConfig), applied to a missing or null key.
PEFT_DEFAULTS = {"r": 8, "lora_alpha": 8, "lora_dropout": 0.0, "use_rslora": False, "bias": "none",
                 "init_lora_weights": True, "fan_in_fan_out": False, "inference_mode": False, "use_dora": False,
                 "rank_pattern": {}, "alpha_pattern": {}}


def _integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _regex(value) -> bool:
    try:
        re.compile(value)
    except (re.error, TypeError, RecursionError):
        return False
    return True


def _names(value) -> bool:
    return isinstance(value, list) and all(isinstance(name, str) and name for name in value)


def _pattern(value, check) -> bool:
    return isinstance(value, dict) and all(isinstance(k, str) and k and _regex(k) and check(v)
                                           for k, v in value.items())


def _text_or_null(value) -> bool:
    return value is None or isinstance(value, str)


# key -> (check, what the key must be). Keys not listed are not read (see config.py for which are refused).
FIELDS: dict[str, tuple[Callable[[object], bool], str]] = {
    "peft_type": (lambda v: v == "LORA", '"LORA" (lorafit reads LoRA adapters only)'),
    "r": (lambda v: _integer(v) and v >= 1, "a positive integer"),
    "lora_alpha": (lambda v: _number(v) and 0 < v <= MAX_ALPHA, f"a finite number in (0, {MAX_ALPHA:g}]"),
    "lora_dropout": (lambda v: _number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "target_modules": (lambda v: v is None or (isinstance(v, str) and v != "" and _regex(v)) or (_names(v) and v != []),
                       "a non-empty list of module names, a valid regular expression, or null"),
    "use_rslora": (lambda v: isinstance(v, bool), "true or false"),
    "use_dora": (lambda v: isinstance(v, bool), "true or false"),
    "rank_pattern": (lambda v: _pattern(v, lambda r: _integer(r) and r >= 1),
                     "a mapping of module-name patterns to positive integers"),
    "alpha_pattern": (lambda v: _pattern(v, lambda a: _number(a) and 0 < a <= MAX_ALPHA),
                      f"a mapping of module-name patterns to numbers in (0, {MAX_ALPHA:g}]"),
    "bias": (lambda v: isinstance(v, str) and v in BIASES, f"one of {', '.join(BIASES)}"),
    "modules_to_save": (lambda v: v is None or _names(v), "a list of module names or null"),
    "layers_to_transform": (lambda v: v is None or (_integer(v) and v >= 0) or
                            (isinstance(v, list) and v != [] and all(_integer(i) and i >= 0 for i in v)),
                            "a block index, a non-empty list of block indices, or null"),
    "init_lora_weights": (lambda v: isinstance(v, bool) or v in PEFT_INITS or
                          (isinstance(v, str) and re.fullmatch(r"pissa_niter_\d+", v) is not None),
                          f'true, false, "pissa_niter_N" or one of {", ".join(PEFT_INITS)}'),
    "base_model_name_or_path": (_text_or_null, "a string or null"),
    "task_type": (_text_or_null, "a string or null"),
    "revision": (_text_or_null, "a string or null"),
    "fan_in_fan_out": (lambda v: isinstance(v, bool), "true or false"),
    "inference_mode": (lambda v: isinstance(v, bool), "true or false"),
}


def checked_fields(data: dict) -> tuple[dict, str | None]:
    """(the read keys with PEFT's defaults filled in, None) when every read key is valid, else ({}, the problem)."""
    values = {}
    for key, (check, meaning) in FIELDS.items():
        value = data.get(key)
        if value is None and key in PEFT_DEFAULTS:
            value = PEFT_DEFAULTS[key]
        if value is None and key == "peft_type":
            value = "LORA"
        if not check(value):
            shown = repr(value)
            return {}, f"{key} must be {meaning}, got {shown if len(shown) <= 80 else shown[:77] + '...'}"
        values[key] = value
    return values, None
