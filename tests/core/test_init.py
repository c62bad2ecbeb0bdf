"""PiSSA and OLoRA: the same factors and residual as PEFT, the base output at the start, and a converted adapter that
loads onto the original base (in PEFT and in lorafit) with the trained model's logits."""

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file

import lorafit
from lorafit import AdapterFileError, LoraConfig, TargetError
from lorafit.core import init as base_init
from lorafit.core.packed import PackedLinear, PackedWeight
from tests.conftest import gaussian, logits, tiny_gpt2, tiny_llama

TARGETS = ["q_proj", "v_proj", "down_proj"]  # square, wide (64 -> 32) and tall (96 -> 64) weights


def pair(peft, init, build=tiny_llama, targets=TARGETS, rslora=False):
    """(lorafit model, PEFT model) of the same base, both initialised with `init`."""
    ours = lorafit.inject(build(), LoraConfig(r=4, alpha=8, targets=targets, init=init, rslora=rslora))
    theirs = peft.get_peft_model(build(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                          init_lora_weights=init, use_rslora=rslora))
    return ours, theirs


def layer_pairs(ours, theirs):
    """(lorafit LoRA layer, the PEFT layer at the same path) for every adapted module."""
    for path, layer in lorafit.lora_layers(ours):
        yield layer, theirs.base_model.model.get_submodule(path)


def perturb(ours, theirs, seed=0):
    """The same 'training' on both: A and B moved by the same random amounts."""
    with torch.no_grad():
        for i, (layer, peft_layer) in enumerate(layer_pairs(ours, theirs)):
            for ours_p, theirs_p, k in ((layer.lora["default"].lora_A, peft_layer.lora_A["default"].weight, 0),
                                        (layer.lora["default"].lora_B, peft_layer.lora_B["default"].weight, 1)):
                step = 0.05 * gaussian(ours_p.shape, seed=seed + 2 * i + k)
                ours_p.add_(step)
                theirs_p.add_(step)


@pytest.mark.parametrize("build, targets, init", [
    (tiny_llama, TARGETS, "pissa"), (tiny_llama, TARGETS, "olora"), (tiny_gpt2, ["c_attn", "c_proj"], "pissa")])
def test_factors_and_residual_equal_pefts(build, targets, init, peft):
    ours, theirs = pair(peft, init, build, targets)
    for layer, peft_layer in layer_pairs(ours, theirs):
        update = layer.lora["default"]
        torch.testing.assert_close(update.lora_A, peft_layer.lora_A["default"].weight, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(update.lora_B, peft_layer.lora_B["default"].weight, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(layer.weight, peft_layer.base_layer.weight, rtol=1e-5, atol=1e-6)


def test_pissa_niter_equals_pefts_with_the_same_random_sketch(peft, monkeypatch):
    """PEFT draws svd_lowrank's sketch from the global RNG; seeded as lorafit seeds it, the factors agree."""
    def seeded(weight, q, niter):
        torch.manual_seed(base_init.SKETCH_SEED)
        return torch.svd_lowrank(weight, q=q, niter=niter)

    monkeypatch.setattr(peft.tuners.lora.layer, "svd_lowrank", seeded)
    ours, theirs = pair(peft, "pissa_niter_2")
    for layer, peft_layer in layer_pairs(ours, theirs):
        torch.testing.assert_close(layer.lora["default"].lora_A, peft_layer.lora_A["default"].weight)
        torch.testing.assert_close(layer.lora["default"].lora_B, peft_layer.lora_B["default"].weight)
        torch.testing.assert_close(layer.weight, peft_layer.base_layer.weight)


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_2", "olora"])
def test_injection_keeps_the_base_output_and_residual_plus_ba_is_w0(init, ids):
    base = tiny_llama()
    weights = {k: v.clone() for k, v in base.state_dict().items()}
    model = lorafit.inject(tiny_llama(), LoraConfig(r=4, alpha=8, targets=TARGETS, init=init))
    torch.testing.assert_close(logits(model, ids), logits(base, ids), rtol=1e-5, atol=1e-5)
    for path, layer in lorafit.lora_layers(model):
        update = layer.lora["default"]
        assert update.lora_B.abs().max() > 0 and update.lora_A.abs().max() > 0  # both factors start non-zero
        torch.testing.assert_close(layer.weight + update.delta_weight(), weights[path + ".weight"],
                                   rtol=1e-5, atol=1e-6)


def test_pissa_top_r_part_is_the_best_rank_r_approximation_in_float64():
    """scale·B·A is W0's truncated SVD: checked against torch's SVD in float64 (Eckart-Young); the fast SVD comes
    close on a weight whose spectrum decays (as trained weights' do; on a flat one a rank-r sketch cannot)."""
    q1, _ = torch.linalg.qr(gaussian((24, 16), seed=3))
    q2, _ = torch.linalg.qr(gaussian((16, 16), seed=4))
    weight = q1 @ torch.diag(0.6 ** torch.arange(16.0)) @ q2.T  # (24, 16), singular values 0.6^i
    a, b = base_init.decompose(weight, r=5, scale=2.0, init="pissa")
    u, s, vh = torch.linalg.svd(weight.double())
    best = u[:, :5] @ torch.diag(s[:5]) @ vh[:5]
    torch.testing.assert_close((2.0 * b @ a).double(), best, rtol=0, atol=1e-5)
    a_fast, b_fast = base_init.decompose(weight, r=5, scale=2.0, init="pissa_niter_8")
    assert (2.0 * b_fast @ a_fast - best.float()).norm() < 1e-3 * best.norm()


def test_pissa_niter_is_deterministic_and_leaves_the_callers_rng_alone():
    weight = gaussian((32, 20), seed=4)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = base_init.decompose(weight, 4, 1.0, "pissa_niter_1")
    assert torch.equal(torch.get_rng_state(), state)
    second = base_init.decompose(weight, 4, 1.0, "pissa_niter_1")
    assert all(torch.equal(x, y) for x, y in zip(first, second, strict=True))


@pytest.mark.parametrize("init, rslora", [("pissa", False), ("olora", False), ("pissa", True)])
def test_converted_adapter_equals_pefts_and_gives_the_trained_logits_on_the_original_base(init, rslora, ids,
                                                                                             tmp_path, peft):
    ours, theirs = pair(peft, init, rslora=rslora)
    theirs.save_pretrained(tmp_path / "initial")  # PEFT needs the initial adapter on disk to convert
    perturb(ours, theirs)
    trained = logits(ours, ids)
    torch.testing.assert_close(trained, logits(theirs, ids), rtol=1e-5, atol=1e-5)
    lorafit.save_adapter(ours, tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs", path_initial_model_for_weight_conversion=str(tmp_path / "initial"))

    mine, peft_tensors = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("ours", "theirs"))
    assert set(mine) == set(peft_tensors)
    for key, tensor in peft_tensors.items():
        torch.testing.assert_close(mine[key], tensor, rtol=1e-5, atol=1e-6, msg=key)
    config, peft_config = (json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in ("ours", "theirs"))
    for key in ("r", "lora_alpha", "init_lora_weights", "use_rslora"):
        assert config[key] == pytest.approx(peft_config[key]), key
    assert config["r"] == 8 and config["init_lora_weights"] is True

    by_peft = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "ours")  # the ORIGINAL base
    by_lorafit = lorafit.load_adapter(tiny_llama(), tmp_path / "theirs")
    torch.testing.assert_close(logits(by_peft, ids), trained, rtol=0, atol=1e-5)
    torch.testing.assert_close(logits(by_lorafit, ids), trained, rtol=0, atol=1e-5)
    assert (trained - logits(tiny_llama(), ids)).abs().max() > 1e-3  # the perturbation did change the model


def test_unconverted_adapter_rebuilds_the_residual_as_peft_does(ids, tmp_path, peft):
    ours, theirs = pair(peft, "pissa")
    perturb(ours, theirs)
    theirs.save_pretrained(tmp_path / "theirs")  # PEFT's default: unconverted, init_lora_weights "pissa"
    lorafit.save_adapter(ours, tmp_path / "ours", convert_init=False)
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["init_lora_weights"] == "pissa"
    reference = logits(peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "ours"), ids)
    with pytest.warns(UserWarning, match="init_lora_weights='pissa'.*residual"):
        loaded = lorafit.load_adapter(tiny_llama(), tmp_path / "theirs")
    torch.testing.assert_close(logits(loaded, ids), reference, rtol=0, atol=1e-5)
    torch.testing.assert_close(logits(loaded, ids), logits(ours, ids), rtol=0, atol=1e-5)


def test_unconverted_pissa_niter_adapter_is_refused_by_name(tmp_path):
    model = lorafit.inject(tiny_llama(), LoraConfig(r=2, targets=["q_proj"], init="pissa_niter_1"))
    lorafit.save_adapter(model, tmp_path, convert_init=False)
    base = tiny_llama()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(AdapterFileError, match="init_lora_weights='pissa_niter_1'.*path_initial_model_for"):
        lorafit.load_adapter(base, tmp_path)
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())


def test_disabled_and_delete_give_back_the_original_base(ids):
    base_logits = logits(tiny_llama(), ids)
    original = tiny_llama().model.layers[0].self_attn.q_proj.weight.clone()
    model = lorafit.inject(tiny_llama(), LoraConfig(r=4, targets=TARGETS, init="pissa"))
    with torch.no_grad():
        for _, layer in lorafit.lora_layers(model):
            layer.lora["default"].lora_B.add_(0.1)
    assert (logits(model, ids) - base_logits).abs().max() > 1e-3
    with lorafit.disabled(model):
        torch.testing.assert_close(logits(model, ids), base_logits, rtol=0, atol=1e-5)
    lorafit.delete_adapter(model, "default")
    torch.testing.assert_close(model.model.layers[0].self_attn.q_proj.weight, original, rtol=0, atol=1e-6)
    torch.testing.assert_close(logits(model, ids), base_logits, rtol=0, atol=1e-5)


def test_unload_merged_and_unmerged(ids):
    model = lorafit.inject(tiny_llama(), LoraConfig(r=4, targets=TARGETS, init="olora"))
    with torch.no_grad():
        for _, layer in lorafit.lora_layers(model):
            layer.lora["default"].lora_A.mul_(1.5)
    tuned = logits(model, ids)
    torch.testing.assert_close(logits(lorafit.unload(model), ids), tuned, rtol=0, atol=1e-5)
    model = lorafit.inject(tiny_llama(), LoraConfig(r=4, targets=TARGETS, init="olora"))
    torch.testing.assert_close(logits(lorafit.unload(model, merge_first=False), ids), logits(tiny_llama(), ids),
                               rtol=0, atol=1e-5)


class _Dense(PackedWeight):
    format = "test"

    def __init__(self, weight):
        super().__init__(weight.shape, weight.dtype)
        self.register_buffer("data", weight.clone())

    def dequantize(self, dtype=None):
        return self.data.to(dtype or self.dtype)


def test_refusals_name_the_module_and_change_nothing():
    model = lorafit.inject(tiny_llama(), LoraConfig(r=2, targets=["q_proj"], init="pissa"))
    with pytest.raises(TargetError, match="only adapter"):
        lorafit.inject(model, LoraConfig(r=2, targets=["q_proj", "k_proj"]), name="second")
    plain = lorafit.inject(tiny_llama(), LoraConfig(r=2, targets=["q_proj"]))
    with pytest.raises(TargetError, match="adapter 'default' also"):
        lorafit.inject(plain, LoraConfig(r=2, targets=["q_proj"], init="olora"), name="second")
    with pytest.raises(TargetError, match="embedding"):
        lorafit.inject(tiny_llama(), LoraConfig(r=2, targets=["embed_tokens", "q_proj"], init="pissa"))
    with pytest.raises(TargetError, match="needs r <= 32"):
        lorafit.inject(tiny_llama(), LoraConfig(r=40, targets=["k_proj"], init="pissa"))
    packed = tiny_llama()
    attn = packed.model.layers[1].self_attn
    attn.v_proj = PackedLinear(_Dense(attn.v_proj.weight.detach()), None)
    q_before = packed.model.layers[0].self_attn.q_proj.weight.clone()
    with pytest.raises(TargetError, match="'model.layers.1.self_attn.v_proj' holds a packed .test. weight"):
        lorafit.inject(packed, LoraConfig(r=2, targets=["q_proj", "v_proj"], init="pissa"))
    assert torch.equal(packed.model.layers[0].self_attn.q_proj.weight, q_before)  # checked before any change


def test_config_accepts_the_base_inits_and_names_a_bad_one():
    for init in ("pissa", "olora", "pissa_niter_4"):
        assert LoraConfig(init=init).to_peft()["init_lora_weights"] == init
    assert LoraConfig().to_peft()["init_lora_weights"] is True
    with pytest.raises(lorafit.ConfigError, match="pissa_niter_N"):
        LoraConfig(init="pissa_niter_x")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert LoraConfig.from_peft({"init_lora_weights": False}).init == "kaiming"
