"""The flipped-digits experiment: the flip itself, the talk's parameter counts, and a real (short) run."""

import json

import numpy as np
import pytest
import torch

import lorafit
from lorafit.tools.experiments.flip import METHODS, MLP, FlipConfig, adapt, flip_images, load_images, run


def test_flip_mirrors_exactly_the_fraction_of_the_chosen_classes():
    cfg = FlipConfig(fraction=0.3, classes=(2, 3), flip="lr")
    x_tr, y_tr, _, _ = load_images(cfg)
    flipped, mask = flip_images(x_tr, y_tr, cfg, salt=1)
    chosen = np.isin(y_tr, (2, 3))
    assert mask.sum() == round(0.3 * chosen.sum()) and not (mask & ~chosen).any()
    np.testing.assert_array_equal(flipped[mask], x_tr[mask][:, :, ::-1])
    np.testing.assert_array_equal(flipped[~mask], x_tr[~mask])
    up_down, _ = flip_images(x_tr, y_tr, FlipConfig(flip="ud"), salt=1)
    np.testing.assert_array_equal(up_down[mask], x_tr[mask][:, ::-1, :])


def test_parameter_counts_match_the_talk_for_28x28_inputs():
    model = MLP(784)
    assert sum(p.numel() for p in model.parameters()) == 235_146
    lorafit.inject(model, lorafit.LoraConfig(r=4, targets=["fc1", "fc2", "fc3"]))
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 6_248


def test_lora_method_changes_only_the_adapter(tmp_path):
    cfg = FlipConfig(tune_epochs=1, out=tmp_path)
    x_tr, y_tr, _, _ = load_images(cfg)
    base = MLP(64)
    model, info = adapt("lora", base, torch.from_numpy(x_tr), torch.from_numpy(y_tr).long(), cfg)
    for name, value in base.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name
    assert any(layer.lora["default"].lora_B.abs().sum() > 0 for _, layer in lorafit.lora_layers(model))
    assert info["trainable_params"] == 3_368 and info["checkpoint_bytes"] > info["tensor_bytes"] == 3_368 * 4


def test_run_writes_results_and_is_deterministic(tmp_path):
    small = dict(base_epochs=3, tune_epochs=2)
    first = run(FlipConfig(out=tmp_path / "a", **small), log=lambda _: None)
    second = run(FlipConfig(out=tmp_path / "b", **small), log=lambda _: None)
    saved = json.loads((tmp_path / "a" / "results.json").read_text())
    assert saved["data"] == "digits" and tuple(saved["methods"]) == METHODS
    for method in METHODS:
        keys = {"clean_acc", "flipped_acc", "trainable_params", "checkpoint_bytes", "seconds"}
        assert keys <= set(saved["methods"][method])
        for key in ("clean_acc", "flipped_acc"):
            assert first["methods"][method][key] == second["methods"][method][key]
    assert (tmp_path / "a" / "flip.png").stat().st_size > 0 and (tmp_path / "a" / "table.md").is_file()
    assert (tmp_path / "a" / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_default_run_recovers_most_of_the_drop_with_few_parameters(tmp_path):
    methods = run(FlipConfig(out=tmp_path), log=lambda _: None)["methods"]
    base, lora, last = methods["base"], methods["lora"], methods["last_layer"]
    drop = base["clean_acc"] - base["flipped_acc"]
    assert drop > 2
    assert lora["flipped_acc"] - base["flipped_acc"] >= 0.8 * drop
    assert lora["trainable_params"] <= 0.07 * methods["full"]["trainable_params"]
    assert lora["flipped_acc"] > last["flipped_acc"]


def test_missing_fashion_mnist_says_how_to_install(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_images(FlipConfig(data="fashion-mnist", data_dir=tmp_path))


def test_bad_options_are_refused():
    for kwargs in ({"data": "mnist"}, {"flip": "diagonal"}, {"fraction": 0}, {"rank": 0}):
        with pytest.raises(ValueError):
            FlipConfig(**kwargs)
