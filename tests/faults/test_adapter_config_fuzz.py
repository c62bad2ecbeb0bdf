"""adapter_config.json fuzzed: thousands of mutated configs, each loaded or refused with a lorafit error.

Properties, checked on every case: the only exception is AdapterFileError; a refused load leaves the model as it
was; an accepted config is valid by PEFT's schema (restated here, independently of lorafit's checker) and gives
finite logits; and a config whose only mutations are valid values of keys that do not decide which tensors the
adapter holds loads.
"""

import json
import math
import random
import re
import time
import warnings

import pytest
import torch

import lorafit
from tests.conftest import randomize_lora, tiny_llama

CASES, SECONDS = 3000, 90
VALUES = [None, True, False, 0, 1, -1, 2, 3, 7.5, -3.2, 16, 1e6, 1e7, 1e30, float("nan"), float("inf"), -float("inf"),
          "", "(", "q_proj", ".*", "yes", "true", "gaussian", "pissa", "LORA", "PROMPT_TUNING", "none", "all",
          "lora_only", "CAUSAL_LM", [], ["q_proj"], ["nope"], ["q_proj", "v_proj"], ["q_proj", 3], [0], [0, 1], [-1],
          [True], {}, {"a": 1}, 0.05, 0.999, 1.0]  # fmt: skip
KEYS = ["peft_type", "r", "lora_alpha", "lora_dropout", "target_modules", "use_rslora", "bias", "modules_to_save",
        "layers_to_transform", "init_lora_weights", "base_model_name_or_path", "task_type", "revision",
        "fan_in_fan_out", "inference_mode", "use_dora", "rank_pattern", "alpha_pattern", "layers_pattern",
        "some_new_key"]
# Keys whose valid values do not change which tensors the adapter must hold.
FREE = {"lora_alpha", "lora_dropout", "use_rslora", "init_lora_weights", "base_model_name_or_path", "task_type",
        "revision", "fan_in_fan_out", "inference_mode", "some_new_key", "layers_pattern", "bias"}


def _int(v) -> bool:
    return type(v) is int


def _finite(v) -> bool:
    return type(v) in (int, float) and math.isfinite(v)


def _compiles(v) -> bool:
    try:
        re.compile(v)
        return True
    except re.error:
        return False


def _pattern(value, ok) -> bool:
    """rank_pattern / alpha_pattern: {non-empty regex: value}."""
    return isinstance(value, dict) and all(isinstance(k, str) and k and _compiles(k) and ok(v)
                                           for k, v in value.items())


def valid(data) -> bool:
    """PEFT's LoraConfig schema for the keys a plain LoRA adapter uses; a missing or null key takes the default."""
    if not isinstance(data, dict):
        return False
    get = {k: v for k, v in data.items() if v is not None}.get
    return all([
        get("peft_type", "LORA") == "LORA",
        _int(get("r", 8)) and get("r", 8) >= 1,
        _finite(get("lora_alpha", 8)) and 0 < get("lora_alpha", 8) <= 1e6,
        _finite(get("lora_dropout", 0.0)) and 0 <= get("lora_dropout", 0.0) < 1,
        get("target_modules") is None or (isinstance(get("target_modules"), str) and get("target_modules") != ""
                                          and _compiles(get("target_modules")))
        or (isinstance(get("target_modules"), list) and get("target_modules") != []
            and all(isinstance(t, str) and t for t in get("target_modules"))),
        type(get("use_rslora", False)) is bool,
        get("bias", "none") in ("none", "lora_only", "all") and isinstance(get("bias", "none"), str),
        get("modules_to_save") is None or (isinstance(get("modules_to_save"), list)
                                           and all(isinstance(t, str) and t for t in get("modules_to_save"))),
        get("layers_to_transform") is None or (_int(get("layers_to_transform")) and get("layers_to_transform") >= 0)
        or (isinstance(get("layers_to_transform"), list) and get("layers_to_transform") != []
            and all(_int(i) and i >= 0 for i in get("layers_to_transform"))),
        type(get("init_lora_weights", True)) is bool or get("init_lora_weights") in ("gaussian", "pissa", "olora"),
        all(isinstance(get(k, ""), str) for k in ("base_model_name_or_path", "task_type", "revision")),
        all(type(get(k, False)) is bool for k in ("fan_in_fan_out", "inference_mode")),
        type(get("use_dora", False)) is bool,
        _pattern(get("rank_pattern", {}), lambda v: _int(v) and v >= 1),
        _pattern(get("alpha_pattern", {}), lambda v: _finite(v) and 0 < v <= 1e6),
    ])


def _mutate(config: dict, rng: random.Random) -> tuple[dict, set[str]]:
    data, touched = json.loads(json.dumps(config)), set()
    for _ in range(rng.randint(1, 3)):
        key = rng.choice(KEYS)
        touched.add(key)
        if rng.random() < 0.2:
            data.pop(key, None)
        else:
            data[key] = rng.choice(VALUES)
    return data, touched


def _fingerprint(model: torch.nn.Module) -> tuple:
    return tuple(sorted(model.state_dict())), sum(float(p.double().sum()) for p in model.state_dict().values())


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz") / "adapter"
    model = tiny_llama()
    lorafit.inject(model, lorafit.LoraConfig(r=2, alpha=16, targets=["q_proj", "v_proj"]))
    randomize_lora(model)
    lorafit.save_adapter(model, folder)
    return folder, json.loads((folder / "adapter_config.json").read_text())


def test_mutated_adapter_configs_load_or_are_refused_cleanly(saved):
    folder, original = saved
    rng, model, ids = random.Random(0), tiny_llama().eval(), torch.tensor([[1, 2, 3, 4]])
    base = _fingerprint(model)
    counts = {"accepted": 0, "refused": 0}
    started = time.monotonic()
    for case in range(CASES):
        data, touched = (rng.choice([[], 3, "x", None]), set()) if case % 200 == 199 else _mutate(original, rng)
        (folder / "adapter_config.json").write_text(json.dumps(data))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                lorafit.load_adapter(model, folder)
        except lorafit.AdapterFileError:
            counts["refused"] += 1
            assert _fingerprint(model) == base, f"case {case}: a refused load changed the model: {data}"
            assert not (valid(data) and touched <= FREE), f"case {case}: a valid config was refused: {data}"
        else:
            counts["accepted"] += 1
            assert valid(data), f"case {case}: an invalid config was accepted: {data}"
            with torch.no_grad():
                assert torch.isfinite(model(ids).logits).all(), f"case {case}: non-finite logits: {data}"
            lorafit.unload(model, merge_first=False)
            assert _fingerprint(model) == base
        if time.monotonic() - started > SECONDS:
            break
    assert case + 1 >= 1000 and counts["accepted"] >= 100 and counts["refused"] >= 100, (case, counts)
