"""The Method registry: every method is one registered entry, and a new one needs no edit anywhere else."""

import pytest
import torch

from lorafit import ConfigError
from lorafit.methods import METHODS, Method, MethodConfig, MethodError, get, names, register, save_method, setup
from lorafit.methods.folder import is_method_folder, load_method
from lorafit.training.config import load_run_config
from tests.conftest import tiny_llama


@pytest.fixture
def norms_only():
    """A method defined in the test: only the RMSNorm weights train (it trains base weights)."""

    def train_norms(model, options, lora):
        model.requires_grad_(False)
        for name, param in model.named_parameters():
            param.requires_grad_(name.endswith("norm.weight"))

    method = register(Method("norms", "only the norm weights", setup=train_norms, trains_base=lambda o: True))
    yield method
    del METHODS["norms"]


def test_the_shipped_methods_are_registered_in_order():
    assert names() == ("lora", "full", "freeze", "bitfit", "adapter", "prefix", "prompt", "mezo", "in-context")
    assert [name for name in names() if not get(name).mergeable] == ["adapter", "prefix", "prompt"]
    assert [name for name in names() if not get(name).trains] == ["in-context"]
    with pytest.raises(MethodError, match="method must be one of lora, full, .*, got 'nope'"):
        get("nope")


def test_a_new_method_is_one_registration_config_setup_save_and_load_follow(norms_only, tmp_path):
    options = MethodConfig(name="norms")  # the config accepts it: no list to edit
    model = tiny_llama()
    setup(model, options, None)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all(n.endswith("norm.weight") for n in trained)
    with torch.no_grad():
        for name in trained:
            model.get_parameter(name).add_(0.5)
    save_method(model, tmp_path / "result", options, base_model="tiny", task="causal-lm")
    assert is_method_folder(tmp_path / "result")
    fresh = tiny_llama()
    load_method(fresh, tmp_path / "result")
    for name in trained:
        assert torch.equal(fresh.get_parameter(name), model.get_parameter(name))


def test_the_run_config_asks_the_registry_whether_a_method_trains_base_weights(norms_only, tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text('{"text": "hello"}\n')
    load_run_config(None, ["--data.train", str(data), "--method", "norms"])  # fine on a dense base
    with pytest.raises(ConfigError, match="method norms trains base weights"):
        load_run_config(None, ["--data.train", str(data), "--method", "norms", "--model.quantize", "nf4"])
    with pytest.raises(ConfigError, match="--method.name: must be one of"):
        load_run_config(None, ["--data.train", str(data), "--method", "nope"])
