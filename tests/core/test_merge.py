"""merge / unmerge / unload: W0 + BA folded in and taken out, against the unmerged forward."""

import pytest
import torch

import lorafit
from lorafit import LoraConfig
from lorafit.core.merge import merged_weight
from tests.conftest import randomize_lora, tiny_gpt2, tiny_llama


@pytest.mark.parametrize("build, targets", [(tiny_llama, "all-linear"), (tiny_gpt2, ["c_attn", "c_proj"]),
                                            (tiny_llama, ["embed_tokens", "q_proj"])])
def test_merged_equals_unmerged_and_unmerge_restores_base(build, targets, ids):
    model = build()
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    lorafit.inject(model, LoraConfig(r=4, targets=targets))
    randomize_lora(model)
    unmerged = model(ids).logits
    lorafit.merge(model)
    merged = model(ids).logits
    torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-5)
    lorafit.merge(model)  # idempotent
    torch.testing.assert_close(model(ids).logits, merged, rtol=0, atol=0)
    lorafit.unmerge(model)
    for key, value in base_state.items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(model(ids).logits, unmerged, rtol=1e-5, atol=1e-5)


def test_merge_is_explicit_train_and_eval_do_not_merge(ids):
    model = tiny_llama()
    lorafit.inject(model, LoraConfig(targets=["q_proj"]))
    randomize_lora(model)
    weight = model.model.layers[0].self_attn.q_proj.weight.clone()
    model.train()
    model.eval()
    assert torch.equal(model.model.layers[0].self_attn.q_proj.weight, weight)


def test_merged_weight_matches_float64_reference():
    w = torch.randn(6, 5)
    delta = torch.randn(6, 5) * 1e-3
    expected = (w.double() + delta.double()).float()
    assert torch.equal(merged_weight(w, delta), expected)
    bf = w.to(torch.bfloat16)
    assert merged_weight(bf, delta).dtype == torch.bfloat16


def test_unload_gives_plain_model_with_base_keys(ids):
    model = tiny_gpt2()
    keys = set(model.state_dict())
    lorafit.inject(model, LoraConfig(targets=["c_attn"]))
    randomize_lora(model)
    adapted = model(ids).logits
    lorafit.unload(model)
    assert set(model.state_dict()) == keys
    assert not list(lorafit.lora_layers(model))
    torch.testing.assert_close(model(ids).logits, adapted, rtol=1e-5, atol=1e-5)


def test_disabled_on_a_merged_model_is_an_error_not_a_silent_wrong_answer(ids):
    model = tiny_llama()
    lorafit.inject(model, LoraConfig(targets=["q_proj"]))
    lorafit.merge(model)
    with pytest.raises(RuntimeError, match="unmerge"):
        with lorafit.disabled(model):
            pass
