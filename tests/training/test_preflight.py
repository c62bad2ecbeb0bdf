"""Preflight: what a run can check before it loads a weight fails at once, and leaves no out folder behind."""

import pytest

from lorafit.core import ConfigError
from lorafit.data import DataError
from lorafit.training.preflight import local_config, meta_model, preflight
from lorafit.training.recipe import train
from tests.conftest import tiny_gguf, tiny_job, tiny_run_config


@pytest.fixture
def no_loading(monkeypatch):
    """Any attempt to load model weights fails the test: preflight must catch the mistake first."""
    def load(*args, **kwargs):
        raise AssertionError("the model was loaded before the mistake was reported")
    monkeypatch.setattr("lorafit.training.recipe.load_model", load)


def test_a_target_typo_is_reported_before_the_model_loads_and_no_out_folder_is_made(tmp_path, no_loading):
    job, model = tiny_job(tmp_path)
    cfg = tiny_run_config(job, model, tmp_path / "run", "--lora.targets", "[q_prj, v_proj]")
    with pytest.raises(ConfigError, match=r"^lora.targets: 'q_prj' matches no module of LlamaForCausalLM; did you "
                                          r"mean 'q_proj'\? \(modules LoRA can wrap: .*q_proj"):
        train(cfg, log=lambda _: None)
    assert not (tmp_path / "run").exists()


def test_targets_that_match_nothing_at_all_name_what_could_be_wrapped(tmp_path, no_loading):
    job, model = tiny_job(tmp_path)
    cfg = tiny_run_config(job, model, tmp_path / "run", "--lora.targets", "[qkv]")
    with pytest.raises(ConfigError, match=r"^lora.targets: \['qkv'\] match no module of LlamaForCausalLM; modules"):
        preflight(cfg)


def test_targets_outside_the_chosen_layers_are_reported_early(tmp_path, no_loading):
    job, model = tiny_job(tmp_path)
    cfg = tiny_run_config(job, model, tmp_path / "run", "--lora.targets", "[q_proj]", "--lora.layers", "[5]")
    with pytest.raises(ConfigError, match=r"in layers \[5\]"):
        preflight(cfg)


def test_a_bad_data_file_leaves_no_out_folder(tmp_path, no_loading):
    job, model = tiny_job(tmp_path)
    (job / "train.jsonl").write_text('{"instruction": "a", "output": "b"}\n{oops\n')
    with pytest.raises(DataError, match="train.jsonl line 2: not valid JSON"):
        train(tiny_run_config(job, model, tmp_path / "run"), log=lambda _: None)
    assert not (tmp_path / "run").exists()


def test_an_out_folder_under_a_file_fails_first(tmp_path, no_loading):
    job, model = tiny_job(tmp_path)
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(NotADirectoryError):
        train(tiny_run_config(job, model, tmp_path / "a_file" / "run"), log=lambda _: None)


def test_a_gguf_file_is_checked_from_its_header(tmp_path):
    path = tiny_gguf(tmp_path / "tiny.gguf")
    model = meta_model(str(path))
    assert type(model).__name__ == "LlamaForCausalLM" and model.model.layers[0].self_attn.q_proj.weight.is_meta


def test_a_model_without_a_local_config_is_left_to_loading(tmp_path):
    assert local_config("someone/some-model") is None  # a hub id: only loading (online) can say
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{not json")
    assert local_config(str(tmp_path / "model")) is None  # unreadable: loading reports it properly
