"""LoraConfig: validation at the edge and the PEFT adapter_config.json mapping."""

import re

import pytest

from lorafit import ConfigError, LoraConfig


@pytest.mark.parametrize("kwargs, match", [
    ({"r": 0}, "r must be a positive integer"),
    ({"r": 2.5}, "r must be a positive integer"),
    ({"alpha": -1}, r"alpha must be a finite number in \(0, 1e\+06\]"),
    ({"alpha": float("nan")}, "alpha must be a finite number"),
    ({"dropout": 1.0}, "dropout must be in"),
    ({"init": "xavier"}, "init must be one of"),
    ({"bias": "some"}, "bias must be one of"),
    ({"targets": []}, "targets must be a non-empty list"),
    ({"targets": 3}, "targets must be a list"),
    ({"layers": [-1]}, "layers must be a list of block indices"),
    ({"targets": r"q_proj("}, r"targets 'q_proj\(' is not a valid regular expression"),
])
def test_bad_values_are_refused_with_the_field_name(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        LoraConfig(**kwargs)


def test_peft_round_trip_keeps_every_field():
    cfg = LoraConfig(r=16, alpha=32, dropout=0.05, targets=["q_proj", "k_proj"], rslora=True, init="gaussian",
                     bias="lora_only", modules_to_save=["score"], layers=[0, 3], base_model="some/model")
    assert LoraConfig.from_peft(cfg.to_peft()) == cfg


def test_peft_field_names_are_peft_names():
    peft = LoraConfig(r=4, alpha=8).to_peft()
    assert peft["peft_type"] == "LORA" and peft["lora_alpha"] == 8 and peft["target_modules"] == ["q_proj", "v_proj"]
    assert peft["init_lora_weights"] is True and peft["use_rslora"] is False


def test_other_peft_types_and_unsupported_options_are_errors():
    with pytest.raises(ConfigError, match="peft_type must be \"LORA\" .*, got 'IA3'"):
        LoraConfig.from_peft({"peft_type": "IA3", "r": 8})
    for key, value in [("layer_replication", [[0, 2]]), ("alora_invocation_tokens", [5, 6]),
                       ("kasa_config", {}), ("use_bdlora", {"nblocks": 2}), ("lora_bias", True)]:
        with pytest.raises(ConfigError, match=f"{key}=.* is not supported by lorafit"):
            LoraConfig.from_peft({"peft_type": "LORA", "r": 8, key: value})
    LoraConfig.from_peft({"peft_type": "LORA", "r": 8, "kasa_config": None, "use_bdlora": None})  # PEFT's defaults


def test_rank_and_alpha_patterns_follow_peft_matching_rule():
    """PEFT's get_pattern_key over every module name of a model: the first key matching the name's end at a dot
    boundary, regex keys included; lorafit must pick the same key, hence the same r and alpha."""
    other = pytest.importorskip("peft.utils.other")
    patterns = {r"layers\.0\.self_attn\.q_proj": 16, "q_proj": 2, "proj": 3, "mlp.up_proj": 5, "j": 7}
    cfg = LoraConfig(r=4, alpha=8, rank_pattern=patterns, alpha_pattern={"v_proj": 32.0, "layers.1.mlp.down_proj": 1})
    names = [f"model.layers.{i}.{m}" for i in range(2) for m in
             ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.up_proj", "mlp.down_proj", "proj_x")]
    for name in names:
        key = other.get_pattern_key(patterns.keys(), name)
        assert cfg.rank_of(name) == patterns.get(key, 4), name
        akey = other.get_pattern_key(cfg.alpha_pattern.keys(), name)
        assert cfg.scale_of(name) == cfg.alpha_pattern.get(akey, 8) / cfg.rank_of(name), name
    assert cfg.rank_of("model.layers.0.self_attn.q_proj") == 16 and cfg.rank_of("model.layers.1.self_attn.q_proj") == 2
    assert LoraConfig(r=4, alpha=8, rslora=True, rank_pattern={"q": 16}).scale_of("a.q") == 2.0
    peft_form = cfg.to_peft()
    assert peft_form["rank_pattern"] == patterns and LoraConfig.from_peft(peft_form).alpha_pattern == cfg.alpha_pattern
    for bad, phrase in [({"rank_pattern": {"q": 0}}, "rank_pattern['q'] must be a positive integer"),
                        ({"alpha_pattern": {"(": 2}}, "alpha_pattern key '(' is not a valid regular expression"),
                        ({"rank_pattern": ["q"]}, "rank_pattern must be a mapping")]:
        with pytest.raises(ConfigError, match=re.escape(phrase)):
            LoraConfig(**bad)
    with pytest.raises(ConfigError, match="rank_pattern must be a mapping of module-name patterns"):
        LoraConfig.from_peft({"r": 4, "rank_pattern": {"q": "4"}}, source="a.json")


def test_unknown_keys_warn_by_name_and_load():
    with pytest.warns(UserWarning, match="from_the_future"):
        cfg = LoraConfig.from_peft({"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": "q",
                                    "from_the_future": 1})
    assert cfg.r == 2 and cfg.targets == "q" and cfg.scale == 2.0


def test_peft_defaults_fill_missing_or_null_keys_and_wrong_types_are_refused_by_key():
    """PEFT's LoraConfig defaults (lora_alpha 8, r 8) stand for a missing or null key; a value of the wrong type is
    an error naming the file and the key, never a guess (a string "yes" is not true)."""
    for alpha in ({}, {"lora_alpha": None}):
        cfg = LoraConfig.from_peft({"r": 4, "target_modules": ["q"], **alpha}, source="a.json")
        assert cfg.alpha == 8 and cfg.scale == 2.0
    assert LoraConfig.from_peft({"target_modules": ["q"]}).r == 8
    for key, value, phrase in [("use_rslora", "yes", "use_rslora must be true or false"),
                               ("lora_alpha", 1e30, "lora_alpha must be a finite number"),
                               ("modules_to_save", 3, "modules_to_save must be a list of module names or null"),
                               ("target_modules", "(", "target_modules must be a non-empty list of module names, "
                                                       "a valid regular expression"),
                               ("use_dora", 1, "use_dora must be true or false")]:
        with pytest.raises(ConfigError, match=rf"^a\.json: {re.escape(phrase)}"):
            LoraConfig.from_peft({"target_modules": ["q"], key: value}, source="a.json")


def test_peft_inits_that_leave_the_base_load_as_plain_lora_and_those_that_change_it_are_refused():
    for init in ("eva", "orthogonal", "mica", True, False):
        assert LoraConfig.from_peft({"r": 4, "init_lora_weights": init}).init == "kaiming"
    for init in ("corda", "loftq", "lora_ga"):
        with pytest.raises(ConfigError, match=rf"a\.json: init_lora_weights='{init}': .*path_initial_model"):
            LoraConfig.from_peft({"r": 4, "init_lora_weights": init}, source="a.json")
