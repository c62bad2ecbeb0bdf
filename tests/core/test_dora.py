"""DoRA (lorafit.core.dora): the same model as PEFT's use_dora=True both ways, merging, and on a packed base."""

import warnings

import pytest
import torch

import lorafit
from lorafit.core.dora import WeightDecomposed
from lorafit.quant import dequantize_model, quantize_model
from tests.conftest import tiny_gpt2, tiny_llama

peft = pytest.importorskip("peft")
TARGETS = ["q_proj", "v_proj", "down_proj"]


def _peft_dora(model, dropout=0.0, **kwargs):
    """A PEFT DoRA model whose A, B and magnitudes are all random (so every term of DoRA matters)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, use_dora=True, **kwargs)
        net = peft.get_peft_model(model, cfg)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "lora_" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return net.eval()


def _grads(model, prefix: str) -> dict:
    """Gradients of the adapter's parameters under one naming: <module>.<lora_A|lora_B|lora_magnitude_vector>."""
    out = {}
    for name, p in model.named_parameters():
        if p.grad is not None:
            name = name.removeprefix(prefix).replace(".lora.default.", ".").replace(".default", "")
            out[name.removesuffix(".weight")] = p.grad
    return out


@pytest.mark.parametrize("make, kwargs", [
    (tiny_llama, {"target_modules": TARGETS, "rank_pattern": {"q_proj": 2}, "alpha_pattern": {"v_proj": 32}}),
    (tiny_gpt2, {"target_modules": ["c_attn", "c_proj"], "fan_in_fan_out": True}),
])
def test_a_peft_dora_adapter_gives_peft_logits_in_lorafit_and_back(tmp_path, ids, make, kwargs):
    net = _peft_dora(make(), **kwargs)
    expected = net(ids).logits
    net.save_pretrained(tmp_path / "peft")
    ours = lorafit.load_adapter(make(), tmp_path / "peft").eval()
    layer = next(layer for _, layer in lorafit.lora_layers(ours))
    assert isinstance(layer.lora["default"], WeightDecomposed)
    torch.testing.assert_close(ours(ids).logits, expected, rtol=1e-5, atol=1e-5)
    lorafit.save_adapter(ours, tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(make(), tmp_path / "ours").eval()
    torch.testing.assert_close(back(ids).logits, expected, rtol=1e-5, atol=1e-5)
    # the magnitudes matter: the same A and B as plain LoRA give other logits
    plain = lorafit.LoraConfig.from_peft({**ours.lora_configs["default"].to_peft(), "use_dora": False})
    as_lora = lorafit.inject(make(), plain)
    for (_, a), (_, b) in zip(lorafit.lora_layers(as_lora), lorafit.lora_layers(ours)):
        a.lora["default"].lora_A.data.copy_(b.lora["default"].lora_A)
        a.lora["default"].lora_B.data.copy_(b.lora["default"].lora_B)
    assert (as_lora.eval()(ids).logits - expected).abs().max() > 1e-3


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_dora_trains_with_peft_gradients_dropout_included(tmp_path, ids, dropout):
    """Same loss and same gradients for A, B and m; with dropout, the same masks from the same seed (both draw
    one mask per layer per forward, in module order)."""
    net = _peft_dora(tiny_llama(), dropout=dropout, target_modules=TARGETS, rank_pattern={"v_proj": 2})
    net.save_pretrained(tmp_path / "peft")
    ours = lorafit.load_adapter(tiny_llama(), tmp_path / "peft")
    losses = []
    for model in (net.train(), ours.train()):
        torch.manual_seed(7)
        loss = model(ids, labels=ids).loss
        loss.backward()
        losses.append(loss)
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-6, atol=1e-6)
    theirs, mine = _grads(net, "base_model.model."), _grads(ours, "")
    assert sorted(theirs) == sorted(mine) and len(mine) == 18
    for key in mine:
        torch.testing.assert_close(mine[key], theirs[key], rtol=1e-5, atol=1e-6, msg=key)


def test_dora_starts_at_the_base_model_and_merges_and_unmerges_exactly(ids):
    model = tiny_llama()
    base = model(ids).logits
    lorafit.inject(model, lorafit.LoraConfig(r=4, targets=TARGETS, use_dora=True))
    assert torch.equal(model(ids).logits, base)  # m = ||W0|| and B = 0: W' = W0 exactly
    with torch.no_grad():
        for _, layer in lorafit.lora_layers(model):
            update = layer.lora["default"]
            update.lora_B.normal_(0, 0.1)
            update.lora_magnitude_vector.mul_(1 + 0.1 * torch.randn_like(update.lora_magnitude_vector))
    unmerged = model(ids).logits
    w0 = model.model.layers[0].mlp.down_proj.weight.detach().clone()
    lorafit.merge(model)
    torch.testing.assert_close(model(ids).logits, unmerged, rtol=1e-5, atol=1e-5)
    layer = model.model.layers[0].mlp.down_proj
    norms = torch.linalg.norm(layer.weight, dim=1)  # each merged row has norm m
    torch.testing.assert_close(norms, layer.lora["default"].lora_magnitude_vector, rtol=1e-5, atol=1e-6)
    lorafit.unmerge(model)
    torch.testing.assert_close(layer.weight, w0, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(model(ids).logits, unmerged, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["nf4", "int8"])
def test_qdora_on_a_packed_base_equals_dora_on_its_dense_weights(ids, method):
    """The packed path computes the row norms from ||W0||² and one product on A's rows; the reference builds
    W0 + s B A densely from the same dequantized weights. Forward and gradients agree."""
    packed, dense = tiny_llama(), tiny_llama()
    quantize_model(packed, method)
    lorafit.inject(packed, lorafit.LoraConfig(r=4, targets=TARGETS, use_dora=True))
    quantize_model(dense, method)
    dequantize_model(dense)
    lorafit.inject(dense, lorafit.LoraConfig(r=4, targets=TARGETS, use_dora=True))
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for (_, a), (_, b) in zip(lorafit.lora_layers(packed), lorafit.lora_layers(dense)):
            # the same magnitudes from the packed weight and from its dense form
            torch.testing.assert_close(a.lora["default"].lora_magnitude_vector, b.lora["default"].lora_magnitude_vector)
            for pa, pb in zip(a.lora["default"].parameters(), b.lora["default"].parameters()):
                pa.add_(0.1 * torch.randn(pa.shape, generator=gen))
                pb.copy_(pa)
    outs = []
    for model in (packed, dense):
        loss = model(ids, labels=ids).loss
        loss.backward()
        outs.append((loss, _grads(model, "")))
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-5, atol=1e-5)
    for key, grad in outs[1][1].items():
        torch.testing.assert_close(outs[0][1][key], grad, rtol=1e-4, atol=1e-6, msg=key)


def test_dora_is_refused_where_it_has_no_form():
    with pytest.raises(ValueError, match="no form for embedding tables"):
        lorafit.inject(tiny_llama(), lorafit.LoraConfig(targets=["embed_tokens"], use_dora=True))
    assert lorafit.LoraConfig(variant="dora").use_dora and lorafit.LoraConfig(use_dora=True).variant == "dora"
