"""Adapter files: PEFT reads ours and we read PEFT's with the same logits; bad files fail clearly and safely."""

import json
import warnings

import pytest
import torch
from safetensors import safe_open

import lorafit
from lorafit import AdapterFileError, LoraConfig
from tests.conftest import logits, randomize_lora, tiny_bert, tiny_gpt2, tiny_llama

CASES = [  # (model builder, lorafit targets, PEFT target_modules)
    (tiny_llama, ["q_proj", "v_proj"], ["q_proj", "v_proj"]),
    (tiny_llama, "all-linear", "all-linear"),
    (tiny_gpt2, ["c_attn"], ["c_attn"]),
    (tiny_llama, ["embed_tokens", "q_proj"], ["embed_tokens", "q_proj"]),
]


@pytest.mark.parametrize("build, ours, theirs", CASES)
def test_peft_adapter_loads_into_lorafit_with_same_logits(build, ours, theirs, ids, tmp_path, peft):
    peft_model = peft.get_peft_model(build(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=theirs,
                                                              init_lora_weights=False))  # random, non-zero B
    peft_model.save_pretrained(tmp_path)
    model = lorafit.load_adapter(build(), tmp_path)
    diff = (logits(model, ids) - logits(peft_model, ids)).abs().max().item()
    assert diff <= 1e-5
    assert diff < (logits(build(), ids) - logits(peft_model, ids)).abs().max().item()  # the adapter did something


@pytest.mark.parametrize("build, ours, theirs", CASES)
def test_lorafit_adapter_loads_into_peft_with_same_logits(build, ours, theirs, ids, tmp_path, peft):
    model = lorafit.inject(build(), LoraConfig(r=4, alpha=8, targets=ours))
    randomize_lora(model)
    lorafit.save_adapter(model, tmp_path)
    peft_model = peft.PeftModel.from_pretrained(build(), tmp_path)
    assert (logits(model, ids) - logits(peft_model, ids)).abs().max().item() <= 1e-5


PATTERNS = {"rank_pattern": {"q_proj": 2, r"layers\.1\.mlp\.down_proj": 6}, "alpha_pattern": {"v_proj": 32}}


def test_per_module_ranks_and_alphas_load_and_save_with_peft_logits(ids, tmp_path, peft):
    """rank_pattern / alpha_pattern from PEFT load with PEFT's logits, and the adapter lorafit saves back (its
    patterns included) gives PEFT the same logits; the ranks per module are the patterns'."""
    targets = ["q_proj", "v_proj", "down_proj"]
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                               init_lora_weights=False, **PATTERNS))
    theirs.save_pretrained(tmp_path / "peft")
    ours = lorafit.load_adapter(tiny_llama(), tmp_path / "peft")
    torch.testing.assert_close(logits(ours, ids), logits(theirs, ids), rtol=1e-5, atol=1e-5)
    ranks = {path: layer.lora["default"].lora_A.shape[0] for path, layer in lorafit.lora_layers(ours)}
    assert ranks["model.layers.0.self_attn.q_proj"] == 2 and ranks["model.layers.1.mlp.down_proj"] == 6
    assert ranks["model.layers.0.mlp.down_proj"] == 4 and ranks["model.layers.0.self_attn.v_proj"] == 4
    assert ours.model.layers[0].self_attn.v_proj.lora["default"].scale == 8.0  # alpha 32 / r 4
    lorafit.save_adapter(ours, tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "ours")
    torch.testing.assert_close(logits(back, ids), logits(theirs, ids), rtol=1e-5, atol=1e-5)


def test_lorafit_trains_per_module_ranks_that_peft_reads(ids, tmp_path, peft):
    model = lorafit.inject(tiny_llama(), LoraConfig(r=4, alpha=8, targets=["q_proj", "v_proj", "down_proj"],
                                                    **PATTERNS))
    randomize_lora(model)
    lorafit.save_adapter(model, tmp_path)
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    torch.testing.assert_close(logits(theirs, ids), logits(model, ids), rtol=1e-5, atol=1e-5)
    assert theirs.base_model.model.model.layers[1].mlp.down_proj.lora_A["default"].weight.shape[0] == 6


@pytest.mark.parametrize("bias", ["lora_only", "all"])
def test_modules_to_save_and_bias_round_trip_through_peft(bias, tmp_path, peft):
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(3))
    model = lorafit.inject(tiny_bert(), LoraConfig(r=2, targets=["query", "value"], bias=bias,
                                                   modules_to_save=["classifier"]))
    randomize_lora(model)
    with torch.no_grad():
        model.classifier.weight.mul_(3.0)
        model.bert.encoder.layer[0].attention.self.query.bias.add_(0.5)
        model.bert.encoder.layer[1].output.dense.bias.add_(0.5 if bias == "all" else 0.0)
    lorafit.save_adapter(model, tmp_path)
    peft_model = peft.PeftModel.from_pretrained(tiny_bert(), tmp_path)
    torch.testing.assert_close(logits(peft_model, ids), logits(model, ids), rtol=1e-5, atol=1e-5)
    again = lorafit.load_adapter(tiny_bert(), tmp_path)
    torch.testing.assert_close(logits(again, ids), logits(model, ids), rtol=0, atol=0)


def test_peft_modules_to_save_and_bias_load_into_lorafit(tmp_path, peft):
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(3))
    peft_model = peft.get_peft_model(tiny_bert(), peft.LoraConfig(
        r=2, target_modules=["query"], bias="lora_only", modules_to_save=["classifier"], init_lora_weights=False))
    with torch.no_grad():
        peft_model.base_model.model.classifier.modules_to_save["default"].weight.mul_(3.0)
        peft_model.base_model.model.bert.encoder.layer[0].attention.self.query.base_layer.bias.add_(0.5)
    peft_model.save_pretrained(tmp_path)
    model = lorafit.load_adapter(tiny_bert(), tmp_path)
    torch.testing.assert_close(logits(model, ids), logits(peft_model, ids), rtol=1e-5, atol=1e-5)


def test_file_layout_keys_shapes_and_config(tmp_path):
    model = lorafit.inject(tiny_gpt2(), LoraConfig(r=4, alpha=8, targets=["c_attn"]))
    info = lorafit.save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    assert config["fan_in_fan_out"] is True and config["target_modules"] == ["c_attn"]
    with safe_open(str(tmp_path / "adapter_model.safetensors"), "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    assert shapes == {f"base_model.model.transformer.h.{i}.attn.c_attn.lora_{m}.weight": s
                      for i in range(2) for m, s in [("A", (4, 32)), ("B", (96, 4))]}
    assert info["tensor_bytes"] == 2 * (4 * 32 + 96 * 4) * 4
    assert info["tensor_bytes"] < info["file_bytes"] < info["tensor_bytes"] + 2048  # only a small header


def test_unknown_config_keys_warn_by_name(tmp_path):
    lorafit.save_adapter(lorafit.inject(tiny_llama(), LoraConfig()), tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["shiny_new_option"] = 3
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lorafit.load_adapter(tiny_llama(), tmp_path)
    assert any("shiny_new_option" in str(w.message) for w in caught)


def _saved(tmp_path, build=tiny_llama, **cfg):
    model = lorafit.inject(build(), LoraConfig(**cfg))
    randomize_lora(model)
    lorafit.save_adapter(model, tmp_path)
    return tmp_path


def _assert_untouched_after(error_match, model, path):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    types = [type(m) for m in model.modules()]
    with pytest.raises(AdapterFileError, match=error_match):
        lorafit.load_adapter(model, path)
    assert [type(m) for m in model.modules()] == types
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_truncated_file_is_a_clear_error_and_model_untouched(tmp_path):
    path = _saved(tmp_path)
    weights = path / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    _assert_untouched_after(r"adapter_model.safetensors.*corrupt or truncated", tiny_llama(), path)


def test_garbage_file_is_a_clear_error(tmp_path):
    path = _saved(tmp_path)
    (path / "adapter_model.safetensors").write_bytes(b"\x80\x04not a safetensors file at all")
    _assert_untouched_after(r"adapter_model.safetensors", tiny_llama(), path)


def test_missing_tensor_names_the_key(tmp_path):
    from safetensors.torch import load_file, save_file

    path = _saved(tmp_path)
    tensors = load_file(path / "adapter_model.safetensors")
    del tensors["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"]
    save_file(tensors, path / "adapter_model.safetensors")
    _assert_untouched_after(r"missing tensor base_model\.model\.model\.layers\.1\.self_attn\.v_proj\.lora_B",
                            tiny_llama(), path)


def test_adapter_for_another_model_is_a_shape_error(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    path = _saved(tmp_path)
    other = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    _assert_untouched_after(r"q_proj\.lora_A\.weight has shape \(8, 64\), the model needs \(8, 32\)", other, path)


def test_bad_config_value_names_the_key(tmp_path):
    path = _saved(tmp_path)
    config = json.loads((path / "adapter_config.json").read_text())
    config["bias"] = "sometimes"
    (path / "adapter_config.json").write_text(json.dumps(config))
    _assert_untouched_after(r"adapter_config.json.*bias", tiny_llama(), path)
    config["bias"], config["lora_bias"] = "none", True
    (path / "adapter_config.json").write_text(json.dumps(config))
    _assert_untouched_after(r"adapter_config.json.*lora_bias", tiny_llama(), path)


def test_broken_json_and_missing_files(tmp_path):
    path = _saved(tmp_path)
    (path / "adapter_config.json").write_text("{not json")
    _assert_untouched_after(r"adapter_config.json: not valid JSON", tiny_llama(), path)
    (path / "adapter_config.json").unlink()
    _assert_untouched_after(r"adapter_config.json: not found", tiny_llama(), path)


def test_pickle_adapter_is_refused(tmp_path):
    path = _saved(tmp_path)
    (path / "adapter_model.safetensors").unlink()
    torch.save({"x": torch.zeros(1)}, path / "adapter_model.bin")
    _assert_untouched_after(r"safetensors only.*adapter_model.bin", tiny_llama(), path)


def test_load_onto_model_that_already_has_an_adapter(tmp_path, ids):
    path = _saved(tmp_path, targets=["v_proj"])
    reference = lorafit.load_adapter(tiny_llama(), path)
    model = lorafit.inject(tiny_llama(), LoraConfig(targets=["q_proj", "v_proj"]), name="first")
    lorafit.load_adapter(model, path, name="second")
    assert model.lora_active == "second"
    torch.testing.assert_close(logits(model, ids), logits(reference, ids), rtol=0, atol=0)
    with pytest.raises(ValueError, match="already has an adapter named 'second'"):
        lorafit.load_adapter(model, path, name="second")


def test_save_is_atomic_and_leaves_no_temp_files(tmp_path):
    path = _saved(tmp_path)
    assert sorted(p.name for p in path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


def test_a_loaded_adapter_follows_the_models_mode_no_dropout_in_eval(tmp_path, ids):
    """load_adapter onto a model in eval() must not leave the new LoRA modules training: with dropout in the
    adapter, two identical forward passes would differ."""
    model = tiny_llama()
    lorafit.inject(model, LoraConfig(r=4, dropout=0.5, targets=["q_proj", "v_proj"]))
    randomize_lora(model)
    lorafit.save_adapter(model, tmp_path / "adapter")
    fresh = tiny_llama().eval()
    lorafit.load_adapter(fresh, tmp_path / "adapter")
    assert not any(module.training for module in fresh.modules())
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, fresh(ids).logits, rtol=0, atol=0)
    fresh.train()  # and the mode still follows the model afterwards
    assert all(layer.training and layer.lora["default"].dropout.training for _, layer in lorafit.lora_layers(fresh))
