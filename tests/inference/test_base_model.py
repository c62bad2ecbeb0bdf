"""Which base an adapter folder names: the hub id for PEFT, the preset for lorafit, and a clear way out."""

import json

import pytest

import lorafit
from lorafit.inference.generate import base_model_of
from lorafit.models import PRESETS, preset_of
from lorafit.models.presets import _folder, _target
from lorafit.training.config import load_run_config
from lorafit.training.recipe import adapter_config
from tests.conftest import tiny_llama

SMOL = PRESETS["smollm2-135m-instruct"]


def _adapter(folder, base, side=None):
    model = tiny_llama()
    lorafit.inject(model, lorafit.LoraConfig(r=2, targets=["q_proj"], base_model=base))
    lorafit.save_adapter(model, folder, side_files=side)
    return folder


def test_a_run_on_a_preset_records_its_hub_id_for_peft(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text('{"text": "hello"}\n')
    cfg = load_run_config(None, ["--data.train", str(data), "--model.name", SMOL.name])
    assert adapter_config(cfg, tiny_llama()).base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    other = load_run_config(None, ["--data.train", str(data), "--model.name", str(tmp_path / "my-model")])
    assert adapter_config(other, tiny_llama()).base_model == str(tmp_path / "my-model")


def test_lorafit_resolves_its_preset_record_and_a_preset_cache_folder_peft_recorded(tmp_path):
    recorded = _adapter(tmp_path / "ours", SMOL.hub_id, side={"lorafit.json": {"base_preset": SMOL.name}})
    assert json.loads((recorded / "adapter_config.json").read_text())["base_model_name_or_path"] == SMOL.hub_id
    assert base_model_of(recorded) == SMOL.name
    assert base_model_of(_adapter(tmp_path / "peft-made", str(_folder(SMOL)))) == SMOL.name
    assert base_model_of(_adapter(tmp_path / "old", SMOL.name)) == SMOL.name  # older lorafit adapters
    assert base_model_of(_adapter(tmp_path / "hub", "someone/model")) == "someone/model"
    assert preset_of(str(_target(SMOL))) == SMOL.name and preset_of(SMOL.hub_id) is None


def test_a_recorded_base_that_is_not_on_this_machine_says_what_to_pass(tmp_path):
    folder = _adapter(tmp_path / "adapter", "/somewhere/else/model")
    with pytest.raises(ValueError, match=r"'/somewhere/else/model' is not on this machine; pass --model "
                                         r"\(a preset: smollm2-135m-instruct, minilm-l6"):
        base_model_of(folder)
