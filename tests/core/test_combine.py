"""Adapter arithmetic: lorafit's combined adapter equals PEFT's add_weighted_adapter (tensors, r, alpha, logits),
cat is exactly the weighted sum of updates, and adapters that cannot be combined fail clearly."""

import json
import warnings

import pytest
import torch

import lorafit
from lorafit import LoraConfig
from lorafit.core.combine import (
    Adapter,
    CombineError,
    CombineSpec,
    combine,
    combine_adapters,
    read_input,
    split_tensors,
)
from tests.conftest import gaussian, logits, randomize_lora, tiny_gpt2, tiny_llama

WEIGHTS = [0.7, -0.4, 1.3]
# (name, PEFT LoraConfig arguments): one rank for linear / ties / dare; unions of targets; rslora not first
SAME_RANK = [("a", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])),
             ("b", dict(r=4, lora_alpha=16, target_modules=["v_proj", "o_proj"])),
             ("x", dict(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"], use_rslora=True))]
MIXED_RANKS = [("a", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])),
               ("b", dict(r=2, lora_alpha=16, target_modules=["v_proj", "o_proj"])),
               ("x", dict(r=3, lora_alpha=6, target_modules=["q_proj", "k_proj"], use_rslora=True))]
PATTERNS = [("a", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 2},
                       alpha_pattern={"q_proj": 32})),
            ("b", dict(r=3, lora_alpha=6, target_modules=["v_proj", "o_proj"],
                       rank_pattern={r"layers\.1\.self_attn\.o_proj": 5}))]
CASES = [  # (PEFT's combination_type and keywords, lorafit's spec, adapters)
    ("linear", {}, CombineSpec("linear"), SAME_RANK),
    ("ties", dict(density=0.5), CombineSpec("ties", density=0.5), SAME_RANK),
    ("ties", dict(density=0.3, majority_sign_method="frequency"),
     CombineSpec("ties", density=0.3, majority_sign="frequency"), SAME_RANK),
    ("dare_linear", dict(density=1.0), CombineSpec("dare_linear", density=1.0), SAME_RANK),
    ("cat", {}, CombineSpec("cat"), MIXED_RANKS),
    ("svd", {}, CombineSpec("svd"), MIXED_RANKS),
    ("svd", dict(svd_rank=6, svd_clamp=0.9), CombineSpec("svd", rank=6, svd_clamp=0.9), MIXED_RANKS),
    ("cat", {}, CombineSpec("cat"), PATTERNS),  # per-module ranks and alphas
    ("svd", {}, CombineSpec("svd"), PATTERNS),
]


def peft_with_adapters(peft, folder, adapters, build=tiny_llama):
    """A PEFT model carrying `adapters` (random non-zero A and B), each saved to folder/<name>."""
    model = None
    for name, kwargs in adapters:
        cfg = peft.LoraConfig(init_lora_weights=False, **kwargs)
        if model is None:
            model = peft.get_peft_model(build(), cfg, adapter_name=name)
        else:
            model.add_adapter(name, cfg)
        model.save_pretrained(folder, selected_adapters=[name])  # a non-default adapter goes to folder/<name>
    return model


def peft_combined(peft, model, names, weights, method, kwargs) -> dict[str, torch.Tensor]:
    """PEFT's add_weighted_adapter result "c" as the tensors of its saved adapter (no prefix)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns that density 1 prunes nothing
        model.add_weighted_adapter(names, weights, "c", combination_type=method, **kwargs)
    model.set_adapter("c")
    state = peft.utils.get_peft_model_state_dict(model, adapter_name="c")
    return {k.removeprefix("base_model.model."): v for k, v in state.items()}


@pytest.mark.parametrize("method, kwargs, spec, adapters", CASES)
def test_each_method_equals_peft_add_weighted_adapter(method, kwargs, spec, adapters, tmp_path, ids, peft):
    model = peft_with_adapters(peft, tmp_path / "in", adapters)
    names = [name for name, _ in adapters]
    weights = WEIGHTS[:len(names)]
    theirs = peft_combined(peft, model, names, weights, method, kwargs)
    done = combine_adapters([tmp_path / "in" / n for n in names], tmp_path / "out", weights, spec)
    cfg, ours = lorafit.read_adapter(tmp_path / "out")
    assert set(ours) == set(theirs)
    assert max((ours[k] - theirs[k]).abs().max().item() for k in ours) <= 1e-5
    ref = model.peft_config["c"]
    assert (cfg.r, cfg.alpha, done["r"]) == (ref.r, ref.lora_alpha, ref.r)
    assert set(cfg.targets) == set(ref.target_modules)
    ours_net = lorafit.load_adapter(tiny_llama(), tmp_path / "out")
    assert (logits(ours_net, ids) - logits(model, ids)).abs().max().item() <= 1e-5
    assert (logits(ours_net, ids) - logits(tiny_llama(), ids)).abs().max().item() > 1e-3  # it did something


@pytest.mark.parametrize("method", ["linear", "cat", "svd"])
@pytest.mark.parametrize("build, targets", [(tiny_llama, ["embed_tokens", "q_proj"]), (tiny_gpt2, ["c_attn"])])
def test_embeddings_and_gpt2_conv1d_combine_as_peft(method, build, targets, tmp_path, ids, peft):
    adapters = [("a", dict(r=4, lora_alpha=8, target_modules=targets)),
                ("b", dict(r=4, lora_alpha=4, target_modules=targets))]
    model = peft_with_adapters(peft, tmp_path / "in", adapters, build)
    theirs = peft_combined(peft, model, ["a", "b"], [0.6, 0.5], method, {})
    combine_adapters([tmp_path / "in" / "a", tmp_path / "in" / "b"], tmp_path / "out", [0.6, 0.5],
                     CombineSpec(method))
    _, ours = lorafit.read_adapter(tmp_path / "out")
    assert set(ours) == set(theirs)
    assert max((ours[k] - theirs[k]).abs().max().item() for k in ours) <= 1e-5
    ours_net = lorafit.load_adapter(build(), tmp_path / "out")
    assert (logits(ours_net, ids) - logits(model, ids)).abs().max().item() <= 1e-5
    peft_net = peft.PeftModel.from_pretrained(build(), tmp_path / "out")  # PEFT reads the folder too
    assert (logits(peft_net, ids) - logits(model, ids)).abs().max().item() <= 1e-5


def test_dare_linear_draws_as_peft_from_the_same_generator_state(tmp_path, monkeypatch, peft):
    """PEFT draws from torch's global generator after initialising the new adapter; given that state, lorafit
    draws the same masks where the module order agrees (here q_proj, v_proj: model order is path order)."""
    adapters = [(n, dict(kw, target_modules=["q_proj", "v_proj"])) for n, kw in SAME_RANK]
    model = peft_with_adapters(peft, tmp_path / "in", adapters)
    from peft.utils import merge_utils

    states, real = [], merge_utils.random_pruning
    monkeypatch.setattr(merge_utils, "random_pruning", lambda t, density, rescale: (
        states.append(torch.get_rng_state()) if not states else None, real(t, density, rescale))[1])
    theirs = peft_combined(peft, model, ["a", "b", "x"], WEIGHTS, "dare_linear", dict(density=0.4))
    generator = torch.Generator()
    generator.set_state(states[0])
    inputs = [read_input(tmp_path / "in" / n) for n in ("a", "b", "x")]
    _, ours = combine(inputs, WEIGHTS, CombineSpec("dare_linear", density=0.4), generator)
    assert max((ours[k] - theirs[k]).abs().max().item() for k in ours) <= 1e-5


def test_dare_linear_is_the_same_for_a_seed_and_differs_between_seeds(tmp_path, peft):
    peft_with_adapters(peft, tmp_path / "in", SAME_RANK)
    inputs = [read_input(tmp_path / "in" / n) for n in ("a", "b", "x")]
    runs = [combine(inputs, WEIGHTS, CombineSpec("dare_linear", density=0.5, seed=s))[1] for s in (3, 3, 4)]
    key = "model.layers.0.self_attn.v_proj.lora_A.weight"
    assert torch.equal(runs[0][key], runs[1][key]) and not torch.equal(runs[0][key], runs[2][key])


def delta(cfg: LoraConfig, tensors: dict, path: str) -> torch.Tensor:
    """ΔW = scale · B A of module `path`, in fp64."""
    return cfg.scale * tensors[f"{path}.lora_B.weight"].double() @ tensors[f"{path}.lora_A.weight"].double()


def lorafit_adapter(folder, seed, **cfg):
    model = lorafit.inject(tiny_llama(), LoraConfig(**cfg))
    randomize_lora(model, seed)
    lorafit.save_adapter(model, folder)
    return lorafit.read_adapter(folder)


@pytest.mark.parametrize("method", ["cat", "svd", "linear"])
def test_the_result_is_the_weighted_sum_of_updates_in_fp64_also_for_rslora(method, tmp_path):
    """cat is exact at any rank, svd at the sum of ranks; one adapter is given back. rslora inputs fold their
    scale into the tensors: the result has scale 1 (PEFT 0.21.2's would be sqrt(r) too large)."""
    inputs = [lorafit_adapter(tmp_path / "a", 1, r=4, alpha=8, rslora=True, targets=["q_proj", "v_proj"]),
              lorafit_adapter(tmp_path / "b", 2, r=2, alpha=3, targets=["v_proj"])]
    weights = [0.8, -1.5]
    if method == "linear":  # one adapter with weight w: w ΔW
        inputs, weights = inputs[:1], weights[:1]
    spec = CombineSpec("svd", rank=6) if method == "svd" else CombineSpec(method)
    combine_adapters([tmp_path / n for n in "ab"][:len(inputs)], tmp_path / "out", weights, spec)
    cfg, out = lorafit.read_adapter(tmp_path / "out")
    assert cfg.scale == 1.0 and not cfg.rslora
    for path in ("model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"):
        want = sum(w * delta(c, t, path) for w, (c, t) in zip(weights, inputs, strict=True)
                   if f"{path}.lora_A.weight" in t)
        assert (delta(cfg, out, path) - want).abs().max().item() <= 1e-5 * want.abs().max().item()


def test_one_trained_head_is_carried_and_two_are_refused(tmp_path, ids):
    cfg = dict(r=2, targets=["q_proj"], modules_to_save=["lm_head"])
    for name, seed in (("a", 1), ("b", 2)):
        model = lorafit.inject(tiny_llama(), LoraConfig(**cfg))
        randomize_lora(model, seed)
        with torch.no_grad():
            model.lm_head.weight.mul_(1 + seed)
        lorafit.save_adapter(model, tmp_path / name)
    lorafit_adapter(tmp_path / "c", 3, r=2, targets=["v_proj"])
    combine_adapters([tmp_path / "c", tmp_path / "a"], tmp_path / "out", [1.0, 1.0], CombineSpec("cat"))
    cfg_out, tensors = lorafit.read_adapter(tmp_path / "out")
    assert cfg_out.modules_to_save == ["lm_head"]
    assert torch.equal(tensors["lm_head.weight"], lorafit.read_adapter(tmp_path / "a")[1]["lm_head.weight"])
    with pytest.raises(CombineError, match=r"both save base_model.model.lm_head.weight in full, with different values"):
        combine_adapters([tmp_path / "a", tmp_path / "b"], tmp_path / "bad", None, CombineSpec("cat"))


def test_the_first_adapters_side_files_and_base_are_carried(tmp_path):
    model = lorafit.inject(tiny_llama(), LoraConfig(r=2, base_model="some/model"))
    randomize_lora(model)
    lorafit.save_adapter(model, tmp_path / "a", side_files={"lorafit.json": {"base_preset": "p"}})
    lorafit.save_adapter(model, tmp_path / "b")
    combine_adapters([tmp_path / "a", tmp_path / "b"], tmp_path / "out")
    assert json.loads((tmp_path / "out" / "lorafit.json").read_text()) == {"base_preset": "p"}
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        "some/model"


# --- what cannot be combined ---

def in_memory(source, cfg, tensors) -> Adapter:
    return Adapter(source, cfg, *split_tensors(source, tensors))


def pair(r, fan_in=8, fan_out=8, path="m.q_proj", seed=0):
    return {f"{path}.lora_A.weight": gaussian((r, fan_in), seed), f"{path}.lora_B.weight": gaussian((fan_out, r), seed)}


@pytest.mark.parametrize("inputs, weights, spec, message", [
    ([("a", 2, pair(2)), ("b", 2, pair(2))], [1.0], CombineSpec(), "1 weights for 2 adapters"),
    ([("a", 2, pair(2)), ("b", 4, pair(4))], None, CombineSpec("ties", density=0.5),
     r"ties needs adapters of one rank, got a: r=2, b: r=4; use cat or svd"),
    ([("a", 2, pair(2)), ("b", 2, pair(2, fan_in=6))], None, CombineSpec("cat"),
     r"b: base_model.model.m.q_proj.lora_A.weight is \(2, 6\) with B \(8, 2\), but a has \(2, 8\) with B \(8, 2\)"),
    ([("a", 2, pair(2)), ("b", 2, pair(2))], None, CombineSpec("svd", rank=9), "rank 9 is larger than module m.q_proj"),
])
def test_mismatched_adapters_are_refused_naming_folder_and_key(inputs, weights, spec, message):
    adapters = [in_memory(name, LoraConfig(r=r), tensors) for name, r, tensors in inputs]
    with pytest.raises(CombineError, match=message):
        combine(adapters, weights, spec)


@pytest.mark.parametrize("kwargs, message", [
    (dict(method="ties"), "method ties needs a density"),
    (dict(method="linear", density=0.5), "density applies to ties and dare_linear only"),
    (dict(method="cat", rank=4), "rank and svd_clamp apply to svd only"),
    (dict(method="dare_linear", density=0.0), r"density must be in \(0, 1\]"),
    (dict(method="slerp"), "method must be one of linear, cat, svd, ties, dare_linear"),
])
def test_options_that_do_not_fit_the_method_are_refused(kwargs, message):
    with pytest.raises(CombineError, match=message):
        CombineSpec(**kwargs)


def test_dora_and_half_pairs_are_refused():
    with pytest.raises(CombineError, match="lora_magnitude_vector is not plain LoRA"):
        split_tensors("d", {**pair(2), "m.q_proj.lora_magnitude_vector": torch.ones(8)})
    with pytest.raises(CombineError, match=r"m.q_proj.lora_B.weight is missing"):
        split_tensors("h", {"m.q_proj.lora_A.weight": torch.ones(2, 8)})


def test_a_dora_folder_is_refused(tmp_path):
    lorafit_adapter(tmp_path / "a", 1, r=2)
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(ValueError, match="(?i)dora"):
        combine_adapters([tmp_path / "a"], tmp_path / "out")


def test_different_base_models_warn_and_one_adapter_ties_is_linear():
    adapters = [in_memory("a", LoraConfig(r=2, base_model="m1"), pair(2)),
                in_memory("b", LoraConfig(r=2, base_model="m2"), pair(2, seed=1))]
    with pytest.warns(UserWarning, match=r"different base models \(m1, m2\)"):
        combine(adapters)
    with pytest.warns(UserWarning, match="one adapter: combined as linear"):
        _, ties = combine(adapters[:1], None, CombineSpec("ties", density=0.5))
    assert torch.equal(ties["m.q_proj.lora_A.weight"], combine(adapters[:1])[1]["m.q_proj.lora_A.weight"])


def test_the_output_may_not_be_an_input_or_a_folder_that_is_not_an_adapter(tmp_path):
    lorafit_adapter(tmp_path / "a", 1, r=2)
    with pytest.raises(CombineError, match="is one of the adapters being combined"):
        combine_adapters([tmp_path / "a"], tmp_path / "a")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "keep.txt").write_text("precious")
    with pytest.raises(CombineError, match="exists and is not an adapter folder"):
        combine_adapters([tmp_path / "a"], tmp_path / "data")
    assert (tmp_path / "data" / "keep.txt").read_text() == "precious"
