"""inject and friends: what gets wrapped, what trains, what stays bit for bit the same."""

import pytest
import torch
from torch import nn

import lorafit
from lorafit import LoraConfig, TargetError
from tests.conftest import randomize_lora, tiny_bert, tiny_gpt2, tiny_llama


def test_inject_keeps_outputs_bit_for_bit(ids):
    for build, targets in [(tiny_llama, ["q_proj", "v_proj"]), (tiny_llama, "all-linear"), (tiny_gpt2, ["c_attn"]),
                           (tiny_llama, ["embed_tokens", "q_proj"])]:
        model = build()
        before = model(ids).logits
        lorafit.inject(model, LoraConfig(r=4, targets=targets))
        assert torch.equal(model(ids).logits, before), (build.__name__, targets)


def test_inject_keeps_base_state_dict_keys_and_only_adds_lora_keys():
    model = tiny_llama()
    keys = set(model.state_dict())
    lorafit.inject(model, LoraConfig(targets=["q_proj", "v_proj"]))
    new = set(model.state_dict())
    assert keys <= new
    assert all(".lora.default.lora_" in k for k in new - keys)
    assert len(new - keys) == 2 * 2 * 2  # 2 layers x (q, v) x (A, B)
    model2 = tiny_llama(seed=5)  # a base checkpoint loads unchanged into the injected model
    missing, unexpected = model.load_state_dict(model2.state_dict(), strict=False)
    assert unexpected == [] and all(".lora." in k for k in missing)


def test_only_lora_parameters_require_grad():
    model = tiny_llama()
    lorafit.inject(model, LoraConfig(targets=["q_proj", "v_proj"]))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora.default.lora_" in n for n in trainable)


def test_gpt2_medium_report_matches_the_paper_line():
    from transformers import GPT2Config, GPT2LMHeadModel

    with torch.device("meta"):
        model = GPT2LMHeadModel(GPT2Config(n_embd=1024, n_layer=24, n_head=16))
    lorafit.inject(model, LoraConfig(r=8, targets=["c_attn"]))
    assert lorafit.trainable_report(model) == (
        "trainable params: 786,432 || all params: 355,609,600 || trainable%: 0.2212")


def test_targets_regex_is_matched_in_full_and_list_by_suffix():
    model = tiny_llama()
    assert lorafit.find_targets(model, LoraConfig(targets=r".*\.0\.self_attn\.q_proj")) == [
        "model.layers.0.self_attn.q_proj"]
    with pytest.raises(TargetError):  # a regex that only matches a part of the name selects nothing
        lorafit.find_targets(model, LoraConfig(targets=r"q_proj"))
    names = lorafit.find_targets(model, LoraConfig(targets=["self_attn.v_proj"]))
    assert names == ["model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.v_proj"]


def test_all_linear_leaves_out_the_output_head():
    model = tiny_llama()
    names = lorafit.find_targets(model, LoraConfig(targets="all-linear"))
    assert "lm_head" not in names and len(names) == 2 * 7


def test_layers_restricts_to_block_indices():
    names = lorafit.find_targets(tiny_gpt2(), LoraConfig(targets=["c_attn"], layers=[1]))
    assert names == ["transformer.h.1.attn.c_attn"]


def test_target_matching_nothing_lists_candidates():
    with pytest.raises(TargetError, match=r"match no module.*q_proj.*v_proj"):
        lorafit.inject(tiny_llama(), LoraConfig(targets=["query"]))


def test_target_of_unsupported_type_names_module_and_type():
    with pytest.raises(TargetError, match=r"model.norm.*LlamaRMSNorm.*nn.Linear"):
        lorafit.inject(tiny_llama(), LoraConfig(targets=["norm"]))


def test_failed_inject_leaves_model_untouched():
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(TargetError):
        lorafit.inject(model, LoraConfig(targets=["q_proj"], modules_to_save=["nonexistent_head"]))
    assert not list(lorafit.lora_layers(model))
    assert all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_bias_and_modules_to_save_train_in_full():
    model = tiny_bert()
    lorafit.inject(model, LoraConfig(targets=["query"], bias="lora_only", modules_to_save=["classifier"]))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "classifier.weight" in trainable and "classifier.bias" in trainable
    assert "bert.encoder.layer.0.attention.self.query.bias" in trainable
    assert "bert.encoder.layer.0.attention.self.key.bias" not in trainable
    model = tiny_bert()
    lorafit.inject(model, LoraConfig(targets=["query"], bias="all"))
    assert "bert.encoder.layer.0.attention.self.key.bias" in {n for n, p in model.named_parameters()
                                                              if p.requires_grad}


def test_several_adapters_switch_and_delete(ids):
    model = tiny_llama()
    base = model(ids).logits
    lorafit.inject(model, LoraConfig(targets=["q_proj"]), name="one")
    randomize_lora(model, seed=1)
    out_one = model(ids).logits
    lorafit.inject(model, LoraConfig(targets=["v_proj"]), name="two")
    assert torch.equal(model(ids).logits, base)  # "two" is active and starts at zero; "one" is not added
    lorafit.set_adapter(model, "one")
    assert torch.equal(model(ids).logits, out_one)
    assert lorafit.adapter_names(model) == ["one", "two"]
    lorafit.delete_adapter(model, "one")
    assert lorafit.adapter_names(model) == ["two"] and model.lora_active == "two"
    assert isinstance(model.model.layers[0].self_attn.q_proj, nn.Linear)  # back to a plain Linear
    assert torch.equal(model(ids).logits, base)
    with pytest.raises(KeyError, match="one"):
        lorafit.set_adapter(model, "one")


def test_disabled_gives_base_output_and_restores(ids):
    model = tiny_gpt2()
    base = model(ids).logits
    lorafit.inject(model, LoraConfig(targets=["c_attn", "c_fc"]))
    randomize_lora(model)
    adapted = model(ids).logits
    assert not torch.allclose(adapted, base)
    with lorafit.disabled(model):
        assert torch.equal(model(ids).logits, base)
    assert torch.equal(model(ids).logits, adapted)


def test_gradients_reach_lora_and_not_base(ids):
    model = tiny_llama()
    lorafit.inject(model, LoraConfig(targets=["q_proj", "v_proj"]))
    model.train()
    model(ids, labels=ids).loss.backward()
    for name, param in model.named_parameters():
        assert (param.grad is not None) == (".lora." in name), name
    # B starts at zero, so only B gets a gradient at step 0 (A's gradient is B^T times something)
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.lora["default"].lora_B.grad.abs().sum() > 0


def test_disabled_gives_back_the_base_head_of_a_classifier_trained_in_full(ids):
    """modules_to_save train in full; inside disabled() they hold their base values (as PEFT's disable_adapter),
    so a "base" score never uses the trained head, and the trained values come back after."""
    model = tiny_bert()
    base_logits = model(ids).logits
    lorafit.inject(model, LoraConfig(r=2, targets=["query", "value"], modules_to_save=["classifier"]))
    randomize_lora(model)
    with torch.no_grad():
        model.classifier.weight.add_(1.0)  # as training would change the new head
    trained = model(ids).logits
    with lorafit.disabled(model):
        torch.testing.assert_close(model(ids).logits, base_logits, rtol=0, atol=0)
    torch.testing.assert_close(model(ids).logits, trained, rtol=0, atol=0)
    assert not [key for key in model.state_dict() if "original" in key]  # the base copy is not in the state dict
